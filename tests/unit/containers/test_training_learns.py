"""Proof that the trainer learns. A LoRA trained through `python -m loraflow_training train` on two
generated subjects, each with its own trigger word ("dwjz" = a red circle on white, "qvkx" = a blue square
on black), must:

- lower the denoising loss on its training images at fixed noise seeds and timesteps, clearly, against
  the base model;
- tie each subject to its own trigger: on a subject's images, its own trigger gives a lower loss than
  the other subject's trigger, where the base model can barely tell the two words apart;
- change outputs more for prompts with the trigger word than for unrelated prompts.

The base model. `build_tiny_sd` has random weights: its VAE's posterior noise buries the image and its
UNet does not denoise, so a LoRA trained on it only learns to damp that noise, whatever the prompt. A LoRA
adapts a model that knows its domain, so the fixture stands in for a pretrained SD:
- the VAE gets a near-deterministic posterior and unit-variance latents (what SD's `scaling_factor` is
  for);
- the tokenizer keeps the domain's words whole, as CLIP's vocabulary does, and the token embeddings are
  scaled by 10 so that words, not positions, dominate the hidden states (in the random tiny CLIP both
  have the same spread, and every prompt encodes alike); the triggers are tokens the base never saw;
- the UNet is fitted (2000 full steps, cosine decay) to every scene ("a green circle on black", ...) at
  8 sizes, each captioned cleanly and 3 times with a made-up word inserted (e.g. "a green zqbt circle
  on black"), as real captions carry words that mean nothing for the image.
Why each: fitted to 32 images the UNet memorised them (loss 0.03 on them, 0.13-0.38 on a new size), and
any LoRA then mostly relearnt the scenes, moving unrelated prompts about as much as the triggers. Without
the made-up words the base reacts to a new word as if it meant something: its trigger gap (below) was
-0.042 to +0.012, and on the base that leaned most, the specificity stayed 1.16-1.19 whatever the
training settings (text-encoder lr halved, 600 steps, UNet-only, lr 3e-4).

Measured over 12 runs on 1 CPU thread (base seeds 0-3 x training seeds 1-3). This test runs base 1,
training 1; "this run" gives its numbers on 1 thread / on 2 (the summation order changes the fitted
base).
- LoRA loss / base loss on the training images: 0.713 to 0.854 (this run 0.745 / 0.736).
- Trigger gap (loss with the other subject's trigger minus with the own one): LoRA on 0.042 to 0.107
  (this run 0.081 / 0.098); the base -0.012 to +0.004 (this run 0.000 / 0.004).
- Specificity: the mean |LoRA - base| noise prediction for the 4 trigger prompts ("dwjz", "a photo of
  qvkx", ...) on their subject's images over that for 4 unrelated scene prompts on their own images:
  1.55 to 2.29 (this run 1.62 / 1.88).
- The WEAK_LORA effect: 0.105 to 0.131 mean pixel change, 26x or more the 1/255 threshold (on an
  earlier base, 100 steps at lr 1e-3 / 1e-4 / 1e-5 gave 0.038 / 0.024 / 0.0023, the last flagged).

The text-encoder learning rate is a tenth of the UNet's (a common choice); at the UNet's own rate the
specificity is 1.97 and 1.62 (bases 0 and 1, training 1), so it is not what makes the margin. The
specificity on the way there (the unrelated prompts read on their own images unless said): without the
made-up words 1.16-1.66 over 10 runs, and 1.15-1.26 (2 runs) with the text-encoder LoRA at the UNet's
rate; fitted to 32 images 0.85-2.3 over 10 runs; with the byte-level tokenizer and unscaled embeddings
(unrelated prompts read on the subjects' images, 9 runs) 0.94-1.35.
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

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

Colour = tuple[int, int, int]
COLOURS: dict[str, Colour] = {
    "red": (220, 40, 40),
    "blue": (40, 60, 220),
    "green": (40, 200, 60),
    "yellow": (230, 220, 40),
}
SHAPES = ("circle", "square")
BACKGROUNDS: dict[str, Colour] = {"white": (235, 235, 225), "black": (25, 25, 35)}
SIZE = 64
# The LoRA's subjects: folder -> (colour, shape, background); each image's caption is the folder's trigger.
SUBJECTS = {"4_dwjz": ("red", "circle", "white"), "4_qvkx": ("blue", "square", "black")}
OTHER_TRIGGER = {"dwjz": "qvkx", "qvkx": "dwjz"}
TRIGGER_PROMPTS = ("dwjz", "qvkx", "a photo of dwjz", "a photo of qvkx")
# Prompts unrelated to the subjects: other scenes the base knows, each read on its own images.
UNRELATED_SCENES = (
    ("green", "circle", "black"),
    ("yellow", "square", "white"),
    ("blue", "circle", "white"),
    ("red", "square", "black"),
)
# Whole-word tokens, as a real CLIP vocabulary has; the triggers are tokens the base never saw.
VOCABULARY = (*COLOURS, *SHAPES, *BACKGROUNDS, "a", "on", "photo", "of", *OTHER_TRIGGER)
TOKEN_EMBEDDING_SCALE = 10.0  # see the docstring: words, not positions, dominate the hidden states
FILLER_WORD_COUNT = 24  # words without meaning that the base's captions carry (see the docstring)
CAPTION_VARIANTS = 3  # per scene image, besides its clean caption: one filler word inserted
BASE_MARGINS = range(6, 14)  # every scene at 8 sizes: the base learns scenes, not 32 memorised images
BASE_FIT_STEPS = 2000  # full UNet steps, batch 8, cosine decay: most of this test's ~75 s on 2 CPU cores
BASE_FIT_LR = 3e-3
IMAGES_PER_SUBJECT = 4
TRAIN_STEPS = 300
TIMESTEPS = (100, 300, 500, 700, 900)  # where the losses and output changes are read
NOISE_SEEDS = (0, 1, 2)
# Thresholds, from the 12 runs in the docstring.
LOSS_RATIO_LIMIT = 0.92  # LoRA loss / base loss on the training images: 0.713 to 0.854
TRIGGER_GAP_MIN = 0.025  # the LoRA's trigger gap: 0.042 to 0.107
BASE_TRIGGER_GAP_MAX = 0.02  # |the base's trigger gap|: at most 0.012
SPECIFICITY_MIN = 1.3  # trigger-prompt change / unrelated-prompt change: 1.55 to 2.29

CONFIG_TOML = """\
[training_arguments]
resolution = {size}
max_train_steps = {steps}
train_batch_size = 2
learning_rate = 1e-3
text_encoder_lr = 1e-4
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


@torch.no_grad()
def to_latents(pipe: SupportedPipeline, images: Sequence[Image.Image]) -> torch.Tensor:
    """The images as the UNet sees them: posterior means, scaled."""
    return pipe.vae.encode(to_pixels(images)).latent_dist.mean * pipe.vae.config.scaling_factor


def _load(model: Path) -> SupportedPipeline:
    cpu, cache = torch.device("cpu"), model.parent / "model-cache"
    return load_pipeline(str(model), device=cpu, dtype=torch.float32, cache_dir=cache)


# -- the base model ---------------------------------------------------------------------------------


def build_pretrained_base(path: Path, seed: int = 0) -> Path:
    """The tiny SD with a word vocabulary, a content-keeping VAE and a UNet fitted to captioned scenes
    (see the docstring)."""
    fillers = filler_words()
    build_tiny_sd(path, seed, words=(*VOCABULARY, *fillers))
    pipe = _load(path)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight.mul_(TOKEN_EMBEDDING_SCALE)
    scenes = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS, BASE_MARGINS))
    images = [shape_image(c, s, b, margin) for c, s, b, margin in scenes]
    _make_vae_deterministic(pipe, to_pixels(images))
    latents = to_latents(pipe, images)
    rng = np.random.default_rng(seed)
    captions = [_noisy_captions(scene_prompt(c, s, b), fillers, rng) for c, s, b, _ in scenes]
    with torch.no_grad():
        prompts = [caption for variants in captions for caption in variants]
        text = family_of(pipe).encode_prompts(pipe, prompts, (SIZE, SIZE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _fit_unet(pipe, latents.repeat_interleave(1 + CAPTION_VARIANTS, dim=0), text.encoder_hidden_states)
    pipe.save_pretrained(path)
    return path


def filler_words() -> list[str]:
    """Made-up four-consonant words, none a trigger: the noise in the stand-in base's captions."""
    rng, consonants, words = np.random.default_rng(1234), list("bcdfghjklmnpqrstvwxz"), []
    while len(words) < FILLER_WORD_COUNT:
        word = "".join(rng.choice(consonants, 4))
        if word not in OTHER_TRIGGER and word not in words:
            words.append(word)
    return words


def _noisy_captions(caption: str, fillers: Sequence[str], rng: np.random.Generator) -> list[str]:
    """The caption, then variants with a filler word at a random place."""
    variants = [caption]
    for _ in range(CAPTION_VARIANTS):
        words = caption.split()
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(list(fillers))))
        variants.append(" ".join(words))
    return variants


def scene_prompt(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on {background}"


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
    """Plain full-UNet denoising training, batch 8, cosine decay: the stand-in base's "pretraining"."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=BASE_FIT_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, BASE_FIT_STEPS)
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
        schedule.step()
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
        latents = to_latents(pipe, [Image.open(path) for path in paths])
        captions = [path.parent.name.split("_", 1)[1] for path in paths]
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        report = json.loads((dirs.model / "training_report.json").read_text(encoding="utf-8"))
        return cls(pipe, family_of(pipe), latents, captions, scheduler, report)

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

    @torch.no_grad()
    def output_change(self, prompt: str, latents: torch.Tensor) -> float:
        """Mean |LoRA - base| noise prediction for `prompt` on noisy `latents`; the same noise every call."""
        conds = {}
        for enabled in (True, False):  # the text-encoder LoRA changes the prompt's embeddings too
            with self.lora(enabled):
                conds[enabled] = self.family.encode_prompts(self.pipe, [prompt] * len(latents), (SIZE, SIZE))
        changes = []
        for seed, timestep in itertools.product(NOISE_SEEDS, TIMESTEPS):
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
            timesteps = torch.full((len(noise),), timestep)
            noisy = self.scheduler.add_noise(latents, noise, cast(torch.IntTensor, timesteps))
            predictions = []
            for enabled in (True, False):
                with self.lora(enabled):
                    predictions.append(self.family.predict(self.pipe.unet, noisy, timesteps, conds[enabled]))
            changes.append(float(torch.mean(torch.abs(predictions[0] - predictions[1]))))
        return sum(changes) / len(changes)

    def subject_latents(self, trigger: str) -> torch.Tensor:
        return self.latents[[index for index, caption in enumerate(self.captions) if caption == trigger]]

    def trigger_and_unrelated_change(self) -> tuple[float, float]:
        """The LoRA's output change for the trigger prompts on their subject's images, and for the unrelated
        scenes' prompts on their own images (the images each prompt's outputs are made of)."""
        trigger = [
            self.output_change(prompt, self.subject_latents(prompt.split()[-1])) for prompt in TRIGGER_PROMPTS
        ]
        unrelated = []
        for scene in UNRELATED_SCENES:
            images = [shape_image(*scene, margin) for margin in (8, 10)]
            unrelated.append(self.output_change(scene_prompt(*scene), to_latents(self.pipe, images)))
        return sum(trigger) / len(trigger), sum(unrelated) / len(unrelated)

    def trigger_gap(self, lora: bool) -> float:
        """Loss with each image's caption replaced by the other subject's trigger, minus with its own."""
        swapped = [OTHER_TRIGGER[caption] for caption in self.captions]
        return self.denoising_loss(swapped, lora) - self.denoising_loss(self.captions, lora)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Learned:
    base = build_pretrained_base(tmp_path_factory.mktemp("learns-base") / "base", seed=1)
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

    assert abs(base_gap) < BASE_TRIGGER_GAP_MAX, base_gap  # the binding is the LoRA's, not the base's
    assert tuned_gap > TRIGGER_GAP_MIN, tuned_gap


def test_given_trained_lora_when_prompting_trigger_and_unrelated_then_trigger_outputs_change_more(
    learned: Learned,
) -> None:
    trigger, unrelated = learned.trigger_and_unrelated_change()

    assert trigger / unrelated > SPECIFICITY_MIN, (trigger, unrelated)


def test_given_lora_that_learns_when_effect_checked_then_not_flagged_weak(learned: Learned) -> None:
    """The WEAK_LORA check on a domain-aware base (numbers in the module's docstring)."""
    effect = learned.report["effect"]

    assert not effect["weak"], effect
    assert "WEAK_LORA" not in [warning["code"] for warning in learned.report["warnings"]]
