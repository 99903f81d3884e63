"""The LoRA in the kohya / A1111 / ComfyUI format: `lora_unet_…`, `lora_te_…` keys, `.alpha`, `ss_*` metadata.

Keys come from diffusers' `convert_state_dict_to_kohya` (peft `lora_A/lora_B` to `lora_down/lora_up`,
dots to underscores). What it does not do is hand-written here: it writes every `.alpha` as the rank
(so a LoRA trained with another alpha would load at the wrong strength) and it writes no metadata; the
family's specification renames what its community tools name otherwise (`ModelFamily.kohya_names`: SD
1.x's single text encoder is sd-scripts' `lora_te_`, not the converter's `lora_te1_`; SDXL's UNet modules
take sd-scripts' `input_blocks`/`middle_block`/`output_blocks` names). The `ss_*`
keys follow sd-scripts' `train_network.py`, `modelspec.*` Stability's model spec (which sd-scripts
also writes); `sshs_model_hash` is sd-scripts' hash of the tensor payload that A1111 and Civitai use.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from diffusers.utils import convert_state_dict_to_kohya
from loraflow_diffusion.families.base import ExportFacts
from loraflow_shared.base_models import parse_hub_model
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.dataset.layout import Subset, parse_subset_folder
from loraflow_shared.errors import LoraflowError
from safetensors.torch import save, save_file

NETWORK_MODULE = "networks.lora"  # sd-scripts' module name: tells A1111/ComfyUI it is a plain LoRA
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class ComponentLora:
    """One pipeline component's trained LoRA, in peft's layout."""

    name: str  # "unet", "text_encoder" or "text_encoder_2": the pipeline attribute
    state_dict: dict[str, torch.Tensor]  # "<module>.lora_A.weight" / "<module>.lora_B.weight"
    alphas: dict[str, float]  # module -> the alpha that reproduces its scale as kohya's alpha / rank
    adapter_config: dict[str, Any] = field(default_factory=dict)  # peft LoraConfig, for the diffusers file


@dataclass(frozen=True)
class BaseModelFacts:
    """What `ss_*`/`modelspec.*` say about the base model and the network trained on it."""

    model: ExportFacts  # from the family's specification
    network_dim: int
    network_alpha: float
    # kohya's `network_args` the network was trained with (LoCon: conv_dim, conv_alpha), as strings.
    network_args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraMetadataInputs:
    """What the trainer knows about the run that the weights cannot tell."""

    config: TrainingConfig  # as applied: the memory plan's choices filled in
    base_model: str  # the reference the job trained from (diffusers dir, HF id, single file, s3://)
    steps: int
    epochs: int
    started_at: datetime
    finished_at: datetime
    # subset folder (as named in the dataset) -> the caption of each of its images, repeats not applied
    captions_by_subset: Mapping[str, Sequence[str]]
    reg_subsets: Collection[str] = ()  # which of those folders are regularization (class) subsets


def to_kohya_state_dict(loras: Sequence[ComponentLora]) -> dict[str, torch.Tensor]:
    """kohya keys for every component's LoRA, with each module's own alpha, as diffusers' converter names
    them (the family renames them for its tools: `ModelFamily.kohya_names`)."""
    kohya: dict[str, torch.Tensor] = {}
    for lora in loras:
        for module in _modules(lora):
            pair = {
                f"{lora.name}.{module}{_DOWN}": lora.state_dict[module + _DOWN],
                f"{lora.name}.{module}{_UP}": lora.state_dict[module + _UP],
            }
            # One module at a time: the `.alpha` the converter writes (the rank) is then surely this one's.
            for key, value in convert_state_dict_to_kohya(pair).items():
                tensor = torch.tensor(lora.alphas[module]) if key.endswith(".alpha") else value
                kohya[key] = tensor.detach().to("cpu").contiguous()
    return kohya


def _modules(lora: ComponentLora) -> list[str]:
    modules = sorted(key.removesuffix(_DOWN) for key in lora.state_dict if key.endswith(_DOWN))
    expected = {module + suffix for module in modules for suffix in (_DOWN, _UP)}
    unexpected = sorted(set(lora.state_dict) - expected)
    if unexpected:  # DoRA magnitudes, LoRA biases, embeddings: not in kohya's networks.lora format
        raise ValueError(f"{lora.name}: LoRA keys kohya's format cannot hold: {unexpected[:5]}")
    return modules


def kohya_metadata(inputs: LoraMetadataInputs, base: BaseModelFacts, output_name: str) -> dict[str, str]:
    """sd-scripts' `ss_*` training metadata and the `modelspec.*` keys, all as strings."""
    config = inputs.config
    train = {k: v for k, v in inputs.captions_by_subset.items() if k not in inputs.reg_subsets}
    reg = {k: v for k, v in inputs.captions_by_subset.items() if k in inputs.reg_subsets}
    metadata: dict[str, Any] = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": base.network_dim,
        "ss_network_alpha": base.network_alpha,
        "ss_base_model_version": base.model.base_model_version,
        "ss_v2": base.model.sd_v2,
        "ss_v_parameterization": base.model.v_parameterization,
        "ss_sd_model_name": sd_model_name(inputs.base_model),
        "ss_output_name": output_name,
        "ss_resolution": str(tuple(config.resolution)),  # sd-scripts: "(width, height)"
        "ss_max_train_steps": inputs.steps,
        "ss_steps": inputs.steps,
        "ss_num_epochs": inputs.epochs,
        "ss_epoch": inputs.epochs,
        "ss_training_started_at": inputs.started_at.timestamp(),  # sd-scripts: seconds since the epoch
        "ss_training_finished_at": inputs.finished_at.timestamp(),
        "ss_num_train_images": _sample_count(train),
        "ss_num_reg_images": _sample_count(reg),
        "ss_tag_frequency": json.dumps(tag_frequency(train, config.caption_separator)),
        "ss_dataset_dirs": json.dumps(_dataset_dirs(train)),
        "ss_reg_dataset_dirs": json.dumps(_dataset_dirs(reg)),
        **_config_metadata(config),
    }
    if base.network_args:  # sd-scripts writes it only when the network had arguments
        metadata["ss_network_args"] = json.dumps(base.network_args)
    metadata.update(_modelspec(inputs, base, output_name))
    return {key: _as_text(value) for key, value in metadata.items()}


# Training settings as sd-scripts name them in `ss_*` (our config keeps kohya's names).
_CONFIG_KEYS = (
    "learning_rate", "unet_lr", "text_encoder_lr", "network_train_unet_only", "lr_scheduler",
    "lr_warmup_steps", "optimizer_type", "max_grad_norm", "gradient_checkpointing",
    "gradient_accumulation_steps", "mixed_precision", "seed", "noise_offset", "min_snr_gamma",
    "clip_skip", "cache_latents", "shuffle_caption", "keep_tokens", "caption_dropout_rate", "flip_aug",
    "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "prior_loss_weight",
)  # fmt: skip
_RENAMED = {"optimizer_type": "ss_optimizer", "train_batch_size": "ss_batch_size_per_device"}


def _config_metadata(config: TrainingConfig) -> dict[str, Any]:
    values = config.model_dump(include={*_CONFIG_KEYS, "train_batch_size"})
    return {_RENAMED.get(name, f"ss_{name}"): value for name, value in values.items()}


def _modelspec(inputs: LoraMetadataInputs, base: BaseModelFacts, output_name: str) -> dict[str, str]:
    """Stability's model spec 1.0 (as sd-scripts' `sai_model_spec.build_metadata` writes it for a LoRA)."""
    width, height = inputs.config.resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{base.model.architecture}/lora",
        "modelspec.implementation": base.model.implementation,
        "modelspec.title": output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": inputs.finished_at.isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if base.model.v_parameterization else "epsilon",
        "modelspec.trigger_phrase": ", ".join(trigger_words(inputs)),
    }


def trigger_words(inputs: LoraMetadataInputs) -> list[str]:
    """Each training subset's trigger word (`<repeats>_<trigger>[ <class>]`), in folder order, once."""
    words: list[str] = []
    for folder in inputs.captions_by_subset:
        subset = _subset(folder)
        if folder not in inputs.reg_subsets and subset and subset.trigger not in words:
            words.append(subset.trigger)
    return words


def tag_frequency(
    captions_by_subset: Mapping[str, Sequence[str]], separator: str
) -> dict[str, dict[str, int]]:
    """sd-scripts' `ss_tag_frequency`: per subset folder, how often each (lower-cased) tag occurs."""
    frequency: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_subset.items():
        tags = Counter(
            tag
            for caption in captions
            for tag in (t.strip().lower() for t in caption.split(separator))
            if tag
        )
        frequency[folder] = dict(sorted(tags.items(), key=lambda item: (-item[1], item[0])))
    return frequency


def _dataset_dirs(subsets: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int | None]]:
    return {
        folder: {"n_repeats": _repeats(folder), "img_count": len(captions)}
        for folder, captions in subsets.items()
    }


def _sample_count(subsets: Mapping[str, Sequence[str]]) -> int:
    """sd-scripts count images times repeats."""
    return sum(len(captions) * (_repeats(folder) or 1) for folder, captions in subsets.items())


def _repeats(folder: str) -> int | None:
    subset = _subset(folder)
    return subset.repeats if subset else None


def _subset(folder: str) -> Subset | None:
    try:  # folder names were validated at upload; a name that does not parse only loses its metadata
        return parse_subset_folder(PurePosixPath(folder).name)
    except LoraflowError:
        return None


def sd_model_name(base_model: str) -> str:
    """sd-scripts record a local model by its file or folder name; a hub id stays whole. Never a full path."""
    hub = parse_hub_model(base_model)
    if hub is not None:  # pinned by ingest (owner/name@commit): the name tools show is the repo's
        return hub.repo
    if base_model.startswith(("s3://", "/", ".", "~")) or "\\" in base_model or base_model.count("/") > 1:
        return re.split(r"[/\\]", base_model.rstrip("/\\"))[-1]
    return base_model


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def write_kohya_file(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the file with sd-scripts' `sshs_model_hash` (sha256 of the tensor payload) added."""
    payload = save(state_dict, metadata=metadata)
    (header_size,) = struct.unpack("<Q", payload[:8])
    model_hash = hashlib.sha256(payload[8 + header_size :]).hexdigest()
    save_file(state_dict, str(path), metadata={**metadata, "sshs_model_hash": model_hash})
