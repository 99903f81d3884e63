"""kohya's LoCon (`network_args` conv_dim/conv_alpha): the UNet families add their convolutions (and the
resnets' other layers) to the LoRA's targets, each convolution at its own rank and alpha; a transformer
family has none, so the setting is reported, not silently dropped."""

from __future__ import annotations

import pytest
import torch
from loraflow_diffusion.families import FAMILIES, ModelFamily, family_named
from loraflow_shared.dataset.config import NetworkArgs, TrainingConfig
from loraflow_training.network import lora_config, target_modules, trains_convolutions
from loraflow_training.resolve import _ignored_for_family
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

CONV = TrainingConfig(network_dim=8, network_alpha=4, network_args=NetworkArgs(conv_dim=2, conv_alpha=3))
PLAIN = TrainingConfig(network_dim=8, network_alpha=4)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_given_conv_dim_when_family_resolved_then_convolutions_trained_or_reported_as_ignored(
    family: ModelFamily,
) -> None:
    note = f"network_args conv_dim: {family.description} has no convolutions to adapt; ignored"

    trains = trains_convolutions(family, CONV)

    assert trains == (family.name in ("sd15", "sdxl"))
    assert (note in _ignored_for_family(CONV, family)) is not trains
    assert note not in _ignored_for_family(PLAIN, family)
    assert ("conv1" in target_modules(family, CONV, train_text=False)) is trains


def test_given_conv_dim_when_adapter_added_then_convolutions_at_conv_rank_and_alpha_the_rest_at_network() -> (
    None
):
    sd = family_named("sd15")
    torch.manual_seed(0)
    unet = torch.nn.ModuleDict(
        {
            "conv1": torch.nn.Conv2d(4, 4, 3, padding=1),
            "conv2": torch.nn.Conv2d(4, 4, 3, padding=1),
            "conv": torch.nn.Conv2d(4, 4, 3, padding=1),
            "conv_shortcut": torch.nn.Conv2d(4, 4, 1),
            "to_q": torch.nn.Linear(4, 4),
        }
    )
    inject_adapter_in_model(lora_config(CONV, target_modules(sd, CONV, False), sd.conv_target_modules), unet)

    shapes = {
        name: (layer.r["default"], layer.lora_alpha["default"])
        for name, layer in unet.named_modules()
        if isinstance(layer, LoraLayer)
    }
    assert shapes == {
        "conv1": (2, 3),
        "conv2": (2, 3),
        "conv": (2, 3),
        "conv_shortcut": (8, 4),
        "to_q": (8, 4),
    }
