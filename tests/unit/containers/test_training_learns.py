"""Proof that the trainer learns. A LoRA trained through `python -m loraflow_training train` on two
generated subjects, each with its own trigger word ("dwjz" = a red circle on white, "qvkx" = a blue square
on black), must:

- lower the denoising loss on its training images at fixed noise seeds and timesteps, clearly, against
  the base model;
- tie each subject to its own trigger: on a subject's images, its own trigger gives a lower loss than
  the other subject's trigger, where the base model cannot tell the two words apart.

The base model. `build_tiny_sd` has random weights: its VAE's posterior noise (std ~1) buries the image
(latent std ~0.26), and its UNet does not denoise (loss 1.12 on these images, worse than predicting
zero). Measured: a LoRA trained on it only learns to damp that noise, whatever the prompt (swapping the
captions changes the loss by < 1e-4). A LoRA adapts a model that knows its domain, so the fixture stands
in for a pretrained SD: the tiny VAE gets a near-deterministic posterior and unit-variance latents (what
SD's `scaling_factor` is for), and the tiny UNet is fitted for a few hundred full steps to captioned
shapes ("a green circle on black", ...). The subjects' trigger words are then new to it.

Not asserted, because it does not hold on this tiny model: "the LoRA changes outputs more for prompts
with the trigger word than for unrelated prompts". Measured as the mean |LoRA - base| noise prediction
(same noisy latents; seeds 0-2 x timesteps 100-900) for 4 trigger prompts over 4 unrelated ones ("a green
circle on black", "a mountain lake", ...), 9 runs (3 base seeds x 3 training seeds): 0.94 to 1.35, below
1 in 4 runs. Its 32-wide random text encoder gives every prompt similar embeddings, and the LoRA's
text-independent parts (self-attention, cross-attention queries) move every prompt alike.
Split by part (base fitted 1500 steps, 2 runs): the text-encoder LoRA alone moves unrelated prompts as
much as trigger prompts (ratio 0.95-1.18, and it is the largest part), self-attention 0.90-0.97,
cross-attention keys/values 0.56-0.68 (unrelated prompts, more tokens, move more). Levers tried, ratio
over all parts: a base fitted 1500/3000 steps 1.04-1.42; whole-word tokens with dominant token
embeddings 1.03; prior-preservation images with the domain's captions 0.92-1.36; text_encoder_lr 1e-3
1.17; a text encoder fitted with the UNet 1.44, but the LoRA then loses the trigger binding (gap -0.004).
By timestep the ratio is highest at t=999 (1.06-1.25) and ~1.02 by t=100. No margin to assert.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusion_kit import CONFIG_FILE, SageMakerDirs
from loraflow_diffusion.families import ModelFamily, SupportedPipeline, family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny import build_tiny_sd
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]
COLOURS: dict[str, Colour] = {
    "red": (220, 40, 40),
    "blue": (40, 60, 220),
    "green": (40, 200, 60),
    "yellow": (230, 220, 40),
}
BACKGROUNDS: dict[str, Colour] = {"white": (235, 235, 225), "black": (25, 25, 35)}
SIZE = 64
# The LoRA's subjects: folder -> (colour, shape, background); each image's caption is the folder's trigger.
SUBJECTS = {"4_dwjz": ("red", "circle", "white"), "4_qvkx": ("blue", "square", "black")}
OTHER_TRIGGER = {"dwjz": "qvkx", "qvkx": "dwjz"}
IMAGES_PER_SUBJECT = 4
BASE_FIT_STEPS = 400  # full UNet steps, batch 8: about 13 s on 2 CPU cores
BASE_FIT_LR = 3e-3
TRAIN_STEPS = 100
TIMESTEPS = (100, 300, 500, 700, 900)  # where the losses are read
NOISE_SEEDS = (0, 1, 2)
# Thresholds, from 9 runs (base seeds 0-2 x training seeds 1-3; this test runs base 0, training 1):
# LoRA loss / base loss on the training images: 0.827 to 0.928 (this run 0.861).
LOSS_RATIO_LIMIT = 0.95
# Loss with the other subject's trigger minus with the own trigger, LoRA on: 0.0069 to 0.0301 (this run
# 0.0115); the base: within 0.0003 of 0 (this run 0.0001), it cannot tell the triggers apart.
TRIGGER_GAP_MIN = 0.004
BASE_TRIGGER_GAP_MAX = 0.001

CONFIG_TOML = """\
[training_arguments]
resolution = {size}
max_train_steps = {steps}
train_batch_size = 2
learning_rate = 1e-2
seed = {seed}
mixed_precision = "no"

[network_arguments]
network_dim = 4
network_alpha = 4
"""


def shape_image(colour: str, shape: str, background: str, margin: int) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    box = (margin, margin, SIZE - margin, SIZE - margin)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """`[N, 3, H, W]` in [-1, 1], as the trainer feeds the VAE."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _load(model: Path) -> SupportedPipeline:
    cpu, cache = torch.device("cpu"), model.parent / "model-cache"
    return load_pipeline(str(model), device=cpu, dtype=torch.float32, cache_dir=cache)


# -- the base model ---------------------------------------------------------------------------------


def build_pretrained_base(path: Path, seed: int = 0) -> Path:
    """The tiny SD with a content-keeping VAE and a UNet fitted to captioned shapes (see the docstring)."""
    build_tiny_sd(path, seed)
    pipe = _load(path)
    rng = np.random.default_rng(seed)
    combos = itertools.product(COLOURS, ("circle", "square"), BACKGROUNDS, range(2))
    domain = [(shape_image(c, s, b, int(rng.integers(8, 12))), f"a {c} {s} on {b}") for c, s, b, _ in combos]
    pixels = to_pixels([image for image, _ in domain])
    _make_vae_deterministic(pipe, pixels)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        text = family_of(pipe).encode_prompts(pipe, [caption for _, caption in domain], (SIZE, SIZE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _fit_unet(pipe, latents, text.encoder_hidden_states)
    pipe.save_pretrained(path)
    return path


def _make_vae_deterministic(pipe: SupportedPipeline, pixels: torch.Tensor) -> None:
    """Posterior log-variance -14 (std 1e-3) and a scaling factor that gives the latents unit variance."""
    vae = pipe.vae
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -14.0
        spread = float(vae.encode(pixels).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / spread)


def _fit_unet(pipe: SupportedPipeline, latents: torch.Tensor, text: torch.Tensor) -> None:
    """Plain full-UNet denoising training, batch 8: the stand-in base's "pretraining"."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=BASE_FIT_LR)
    unet.train()
    for _ in range(BASE_FIT_STEPS):
        rows = torch.randint(0, len(latents), (8,))
        noise = torch.randn(8, *latents.shape[1:])
        timesteps = torch.randint(0, scheduler.config["num_train_timesteps"], (8,))
        noisy = scheduler.add_noise(latents[rows], noise, cast(torch.IntTensor, timesteps))
        prediction = unet(noisy, timesteps, encoder_hidden_states=text[rows]).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unet.eval()


# -- the LoRA, trained through the entrypoint --------------------------------------------------------


def write_subject_dataset(dataset: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for folder, (colour, shape, background) in SUBJECTS.items():
        (dataset / folder).mkdir(parents=True)
        for index in range(IMAGES_PER_SUBJECT):
            image = shape_image(colour, shape, background, int(rng.integers(8, 12)))
            image.save(dataset / folder / f"img{index}.png")
    config = CONFIG_TOML.format(size=SIZE, steps=TRAIN_STEPS, seed=seed)
    (dataset / CONFIG_FILE).write_text(config, encoding="utf-8")


def train_lora(root: Path, base: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> SageMakerDirs:
    """Run `python -m loraflow_training train` in-process on the subjects; the job's directories."""
    from loraflow_training.__main__ import main

    dirs = SageMakerDirs(root, root / "input" / "data" / "dataset", root / "model", root / "output")
    write_subject_dataset(dirs.dataset, seed)
    config_dir = root / "input" / "config"
    config_dir.mkdir(parents=True)
    hyperparameters = {"config_file": CONFIG_FILE, "base_model": str(base), "job_id": "learns"}
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters), encoding="utf-8")
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)
    exit_code = main(["train"])
    failure = dirs.output / "failure"
    assert exit_code == 0, failure.read_text(encoding="utf-8") if failure.exists() else "no failure file"
    return dirs


# -- measurements ------------------------------------------------------------------------------------


@dataclass
class Learned:
    """The base model with the trained LoRA loaded, and the training images as latents."""

    pipe: SupportedPipeline
    family: ModelFamily
    latents: torch.Tensor
    captions: list[str]  # each training image's caption (its trigger)
    scheduler: DDPMScheduler
    report: dict[str, Any]  # the job's training_report.json

    @classmethod
    def load(cls, base: Path, dirs: SageMakerDirs) -> Learned:
        pipe = _load(base)
        pipe.load_lora_weights(dirs.model)
        paths = sorted(dirs.dataset.glob("*/*.png"))
        with torch.no_grad():
            latents = pipe.vae.encode(to_pixels([Image.open(path) for path in paths])).latent_dist.mean
        captions = [path.parent.name.split("_", 1)[1] for path in paths]
        scaled = latents * pipe.vae.config.scaling_factor
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        report = json.loads((dirs.model / "training_report.json").read_text(encoding="utf-8"))
        return cls(pipe, family_of(pipe), scaled, captions, scheduler, report)

    @contextmanager
    def lora(self, enabled: bool) -> Iterator[None]:
        (self.pipe.enable_lora if enabled else self.pipe.disable_lora)()
        try:
            yield
        finally:
            self.pipe.enable_lora()

    @torch.no_grad()
    def denoising_loss(self, captions: Sequence[str], lora: bool) -> float:
        """Mean noise-prediction MSE on the training images; the same noise for every call."""
        losses = []
        with self.lora(lora):
            cond = self.family.encode_prompts(self.pipe, captions, (SIZE, SIZE))
            for seed, timestep in itertools.product(NOISE_SEEDS, TIMESTEPS):
                noise = torch.randn(self.latents.shape, generator=torch.Generator().manual_seed(seed))
                timesteps = torch.full((len(noise),), timestep)
                noisy = self.scheduler.add_noise(self.latents, noise, cast(torch.IntTensor, timesteps))
                prediction = self.family.predict(self.pipe.unet, noisy, timesteps, cond)
                losses.append(float(torch.mean((prediction - noise) ** 2)))
        return sum(losses) / len(losses)

    def trigger_gap(self, lora: bool) -> float:
        """Loss with each image's caption replaced by the other subject's trigger, minus with its own."""
        swapped = [OTHER_TRIGGER[caption] for caption in self.captions]
        return self.denoising_loss(swapped, lora) - self.denoising_loss(self.captions, lora)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Learned:
    base = build_pretrained_base(tmp_path_factory.mktemp("learns-base") / "base", seed=0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        dirs = train_lora(tmp_path_factory.mktemp("learns-job"), base, seed=1, monkeypatch=monkeypatch)
    return Learned.load(base, dirs)


def test_given_trained_lora_when_denoising_training_images_then_loss_clearly_below_base(
    learned: Learned,
) -> None:
    base = learned.denoising_loss(learned.captions, lora=False)
    tuned = learned.denoising_loss(learned.captions, lora=True)

    assert tuned / base < LOSS_RATIO_LIMIT, (base, tuned)


def test_given_trained_lora_when_prompted_with_other_subjects_trigger_then_loss_higher_than_own(
    learned: Learned,
) -> None:
    base_gap = learned.trigger_gap(lora=False)
    tuned_gap = learned.trigger_gap(lora=True)

    assert abs(base_gap) < BASE_TRIGGER_GAP_MAX, base_gap  # the effect is the LoRA's, not the base's
    assert tuned_gap > TRIGGER_GAP_MIN, tuned_gap


def test_given_lora_that_learns_when_effect_checked_then_not_flagged_weak(learned: Learned) -> None:
    """The WEAK_LORA check on a domain-aware base: this LoRA moves the pixels by 0.089 (23x the 1/255
    threshold); on the same base, 100 steps at lr 1e-3 / 1e-4 / 1e-5 give 0.038 / 0.024 / 0.0023 (weak)."""
    effect = learned.report["effect"]

    assert not effect["weak"], effect
    assert "WEAK_LORA" not in [warning["code"] for warning in learned.report["warnings"]]
