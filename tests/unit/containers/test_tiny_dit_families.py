"""The tiny DiT pipelines (FLUX.1, FLUX.2 klein, Qwen-Image, Z-Image): each folder loads offline as its real
pipeline class, renders deterministically, keeps the given words whole in every tokenizer, round-trips a
transformer LoRA through diffusers' own save/load, and is rebuilt bit for bit from its seed."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from loraflow_diffusion.tiny_families import (
    build_tiny_flux1,
    build_tiny_flux2_klein,
    build_tiny_qwen_image,
    build_tiny_z_image,
    flux1,
    flux2_klein,
    qwen_image,
    z_image,
)
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

WORDS = ("sks", "ohwx", "at", "cat", "dwjz")  # "at" inside "cat": one word's merges must not split another
PROMPT = "a photo of sks cat, ohwx style"
SIZE, STEPS = 64, 2
SHORT_TEXT = 64  # max_sequence_length where the pipeline's default (512) is not what a test is about
MAX_FOLDER_BYTES = 6 * 1024 * 1024


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., Path]
    pipeline: type[DiffusionPipeline]
    lora_targets: tuple[str, ...]

    def __str__(self) -> str:
        return self.name


FLUX1, KLEIN, QWEN, Z = (m.LORA_TARGET_MODULES for m in (flux1, flux2_klein, qwen_image, z_image))
FAMILIES = [
    Family("flux1-dev", partial(build_tiny_flux1, variant="dev"), FluxPipeline, FLUX1),
    Family("flux1-schnell", partial(build_tiny_flux1, variant="schnell"), FluxPipeline, FLUX1),
    Family("flux2-klein", partial(build_tiny_flux2_klein, variant="distilled"), Flux2KleinPipeline, KLEIN),
    Family("flux2-klein-base", partial(build_tiny_flux2_klein, variant="base"), Flux2KleinPipeline, KLEIN),
    Family("qwen-image", build_tiny_qwen_image, QwenImagePipeline, QWEN),
    Family("z-image-turbo", partial(build_tiny_z_image, variant="turbo"), ZImagePipeline, Z),
    Family("z-image-base", partial(build_tiny_z_image, variant="base"), ZImagePipeline, Z),
]
# One variant per family where variants share the transformer class and its LoRA targets.
ONE_PER_FAMILY = [
    f for f in FAMILIES if f.name in {"flux1-dev", "flux2-klein", "qwen-image", "z-image-turbo"}
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small gain nothing from a second thread, and on a busy machine the idle OpenMP workers'
    spinning makes every call several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family built once, with WORDS."""
    return {
        family.name: family.build(tmp_path_factory.mktemp(family.name) / "model", words=WORDS)
        for family in FAMILIES
    }


@pytest.fixture(params=FAMILIES, ids=str)
def built(request: pytest.FixtureRequest, folders: dict[str, Path]) -> tuple[Family, Path]:
    family: Family = request.param
    return family, folders[family.name]


@pytest.fixture(params=ONE_PER_FAMILY, ids=str)
def one_per_family(request: pytest.FixtureRequest, folders: dict[str, Path]) -> tuple[Family, Path]:
    family: Family = request.param
    return family, folders[family.name]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As a process started with HF_HUB_OFFLINE=1 (huggingface_hub reads it at import); no socket connects."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access while loading a tiny pipeline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield


def _load(folder: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe: Any, seed: int = 0, **options: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    output = pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=generator,
        output_type="np",
        **options,
    )
    return np.asarray(output.images)


def _tokenizers(pipe: Any) -> list[PreTrainedTokenizerBase]:
    return [part for part in pipe.components.values() if isinstance(part, PreTrainedTokenizerBase)]


def _lora_layers(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(file.relative_to(folder)): load_file(file) for file in sorted(folder.rglob("*.safetensors"))}


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config: Any = model.config
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _dropout_rates(config: dict[str, Any]) -> list[float]:
    """Every number under a key naming dropout, nested configs (a VLM's text and vision parts) included."""
    rates = [float(v) for k, v in config.items() if "dropout" in str(k) and isinstance(v, int | float)]
    return rates + [rate for v in config.values() if isinstance(v, dict) for rate in _dropout_rates(v)]


def _config(folder: Path, name: str) -> dict[str, Any]:
    return dict(json.loads((folder / name).read_text("utf-8")))


def test_given_folder_when_loaded_offline_then_real_pipeline_class_renders_deterministically(
    built: tuple[Family, Path], offline: None
) -> None:
    family, folder = built
    pipe = _load(folder)

    first, again, other = _render(pipe, seed=0), _render(pipe, seed=0), _render(pipe, seed=1)

    assert type(pipe) is family.pipeline
    assert first.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(first).all()
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_given_words_when_built_then_each_is_one_token_in_every_tokenizer(
    built: tuple[Family, Path], offline: None
) -> None:
    _, folder = built
    tokenizers = _tokenizers(_load(folder))

    assert tokenizers
    for tokenizer in tokenizers:
        for word in WORDS:
            assert len(tokenizer.tokenize(word)) == 1, (type(tokenizer).__name__, word)
            assert len(tokenizer.tokenize(f"a {word},")) == 3, (type(tokenizer).__name__, word)


def test_given_any_model_of_the_pipeline_when_in_train_mode_then_no_dropout_changes_its_output(
    built: tuple[Family, Path], offline: None
) -> None:
    _, folder = built
    models = [part for part in _load(folder).components.values() if isinstance(part, torch.nn.Module)]

    modules = [m for model in models for m in model.modules()]
    dropouts = [m for m in modules if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    # Attention dropout is functional (a rate passed to the attention call in train mode): read the configs.
    rates = [rate for model in models for rate in _dropout_rates(_config_dict(model))]

    assert dropouts and all(dropout.p == 0 for dropout in dropouts)
    assert rates and all(rate == 0 for rate in rates)


def test_given_lora_on_transformer_when_saved_and_loaded_into_fresh_pipeline_then_same_render(
    one_per_family: tuple[Family, Path], offline: None, tmp_path: Path
) -> None:
    family, folder = one_per_family
    trained = _load(folder)
    base = _render(trained, max_sequence_length=SHORT_TEXT)
    torch.manual_seed(0)
    trained.transformer.add_adapter(LoraConfig(r=4, target_modules=list(family.lora_targets)))
    with torch.no_grad():  # peft starts the up weights at zero, an adapter without effect: give it one
        for name, weight in trained.transformer.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.2)
    with_lora = _render(trained, max_sequence_length=SHORT_TEXT)

    family.pipeline.save_lora_weights(  # type: ignore[attr-defined]
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(trained.transformer),
        # Without it the loader assumes lora_alpha == r: peft's default alpha (8 for r=4) would be lost.
        transformer_lora_adapter_metadata=trained.transformer.peft_config["default"].to_dict(),
    )
    fresh = _load(folder)
    fresh.load_lora_weights(tmp_path)
    loaded = _render(fresh, max_sequence_length=SHORT_TEXT)

    assert _lora_layers(fresh.transformer) == _lora_layers(trained.transformer)
    assert np.abs(loaded - with_lora).max() < 1e-6
    assert np.abs(loaded - base).max() > 1e-3


def test_given_same_seed_when_built_twice_then_weights_are_identical_and_another_seed_differs(
    built: tuple[Family, Path], tmp_path: Path
) -> None:
    family, folder = built

    again = _weights(family.build(tmp_path / "again", words=WORDS))
    other = _weights(family.build(tmp_path / "other", words=WORDS, seed=1))
    first = _weights(folder)

    assert first.keys() == again.keys() == other.keys()
    for file, tensors in first.items():
        assert tensors.keys() == again[file].keys(), file
        assert all(torch.equal(tensor, again[file][key]) for key, tensor in tensors.items()), file
    transformer = "transformer/diffusion_pytorch_model.safetensors"
    assert any(not torch.equal(t, other[transformer][k]) for k, t in first[transformer].items())


def test_given_tiny_pipeline_when_saved_then_a_few_megabytes(built: tuple[Family, Path]) -> None:
    family, folder = built

    size = sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())

    print(f"{family.name}: {size / 1024 / 1024:.1f} MiB")
    assert size < MAX_FOLDER_BYTES


@pytest.mark.parametrize("word", ["Sks", "sks2", "a b", ""])
def test_given_word_that_cannot_be_one_token_when_building_then_refused(tmp_path: Path, word: str) -> None:
    with pytest.raises(ValueError, match="lower-case ASCII letters"):
        build_tiny_z_image(tmp_path / "model", words=[word])

    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("builder", [build_tiny_flux1, build_tiny_flux2_klein, build_tiny_z_image])
def test_given_unknown_variant_when_building_then_refused(
    tmp_path: Path, builder: Callable[..., Path]
) -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        builder(tmp_path / "model", variant="pro")

    assert not (tmp_path / "model").exists()


def test_given_variants_when_built_then_configs_differ_as_the_real_checkpoints(
    folders: dict[str, Path],
) -> None:
    dev, schnell = folders["flux1-dev"], folders["flux1-schnell"]
    klein, klein_base = folders["flux2-klein"], folders["flux2-klein-base"]
    turbo, base = folders["z-image-turbo"], folders["z-image-base"]
    scheduler, transformer = "scheduler/scheduler_config.json", "transformer/config.json"

    assert _config(dev, transformer)["guidance_embeds"] is True
    assert _config(schnell, transformer)["guidance_embeds"] is False
    assert _config(dev, scheduler)["use_dynamic_shifting"] is True
    assert _config(schnell, scheduler)["use_dynamic_shifting"] is False
    assert _config(schnell, scheduler)["shift"] == 1.0
    assert _config(klein, "model_index.json")["is_distilled"] is True
    assert _config(klein_base, "model_index.json")["is_distilled"] is False
    assert (_config(turbo, scheduler)["shift"], _config(base, scheduler)["shift"]) == (3.0, 6.0)


def test_given_qwen_image_when_prompt_encoded_then_exactly_the_system_prefix_is_dropped(
    folders: dict[str, Path], offline: None
) -> None:
    pipe = _load(folders["qwen-image"])
    template: str = pipe.prompt_template_encode

    embeds, mask = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))

    prefix_tokens = len(pipe.tokenizer(qwen_image.PROMPT_PREFIX).input_ids)
    assert prefix_tokens == pipe.prompt_template_encode_start_idx == 34
    # What is left after the drop is the prompt and the template's tail, nothing of the system prefix.
    assert embeds.shape[1] == len(pipe.tokenizer(template.format(PROMPT)).input_ids) - prefix_tokens
    assert mask is None  # the pipeline drops an all-ones mask


def test_given_flux2_klein_when_encoded_at_pipeline_and_training_script_layers_then_both_work(
    folders: dict[str, Path], offline: None
) -> None:
    pipe = _load(folders["flux2-klein"])
    width = pipe.transformer.config.joint_attention_dim

    pipeline_default, _ = pipe.encode_prompt(PROMPT, max_sequence_length=SHORT_TEXT)
    training_default, _ = pipe.encode_prompt(
        PROMPT, max_sequence_length=SHORT_TEXT, text_encoder_out_layers=(10, 20, 30)
    )

    assert pipeline_default.shape == training_default.shape == (1, SHORT_TEXT, width)
    assert not torch.equal(pipeline_default, training_default)
    stats = pipe.vae.bn  # normalises latents: fresh statistics (0, 1) would make that a no-op
    assert stats.running_mean.abs().min() > 0
    assert not torch.allclose(stats.running_var, torch.ones_like(stats.running_var))
