"""Proof that the trainer learns, on the toy world's fitted base (`loraflow_diffusion.toy_world`,
committed: nothing is fitted here). A LoRA trained through `python -m loraflow_training train` on two
subjects drawn in the toy world, each with its own trigger word ("dwjz" = a big red circle on white,
"qvkx" = a big blue square on black, each moved around the centre), must:

- lower the denoising loss on its training images at fixed noise seeds and timesteps, clearly, against
  the base model;
- tie each subject to its own trigger: on a subject's images, its own trigger gives a lower loss than
  the other subject's trigger, where the base model can barely tell the two words apart;
- change outputs more for prompts with the trigger word than for unrelated prompts;
- not be flagged WEAK_LORA.

The base stands in for a pretrained SD: it draws the toy world's colours and shapes from captions, and
the triggers are words it never saw (spelled in bytes by its tokenizer). An earlier version of this test
fitted its own stand-in base for about 2 minutes per run (its findings: a base that memorised a few
images, or that reacts to any new word, gives no margin on specificity).

Measured over training seeds 1, 2 and 3 (this test runs seed 1), 300 steps, lr 1e-3, text-encoder lr
1e-4, rank 4, on the zero-terminal-SNR v-prediction base (losses are of the velocity it predicts):
- LoRA loss / base loss on the training images: 0.177 to 0.196.
- Trigger gap (loss with the other subject's trigger minus with the own one): the base +0.0097 to
  +0.0127, the LoRA +0.424 to +0.428: a gain of 0.414 to 0.416.
- Specificity: the mean |LoRA - base| prediction for the 4 trigger prompts ("dwjz", "a photo of
  qvkx", ...) on their subject's images over that for 4 unrelated scenes' captions on their own images:
  3.98 to 5.28.
- The WEAK_LORA effect: 0.098 to 0.455 mean pixel change (the threshold is 1/255).
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
from diffusion_kit import CONFIG_FILE, SageMakerDirs, write_hyperparameters
from loraflow_diffusion.families import ModelFamily, SupportedPipeline, family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.toy_world.base import copy_toy_base
from loraflow_diffusion.toy_world.world import SIZE, Scene, draw_jittered
from loraflow_local.sample_dataset import OTHER_SCENES
from PIL import Image

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

# The LoRA's subjects: folder -> the scene every picture shows (moved by up to `JITTER` px); each image's
# caption is the folder's trigger.
SUBJECTS = {
    "4_dwjz": Scene("red", "circle", "center", "big", "white"),
    "4_qvkx": Scene("blue", "square", "center", "big", "black"),
}
OTHER_TRIGGER = {"dwjz": "qvkx", "qvkx": "dwjz"}
TRIGGER_PROMPTS = ("dwjz", "qvkx", "a photo of dwjz", "a photo of qvkx")
UNRELATED_SCENES = OTHER_SCENES  # prompts unrelated to the subjects, each read on its own images
IMAGES_PER_SUBJECT = 4
TRAIN_STEPS = 300
TIMESTEPS = (100, 300, 500, 700, 900)  # where the losses and output changes are read
NOISE_SEEDS = (0, 1, 2)
# Thresholds, from the runs in the docstring.
LOSS_RATIO_LIMIT = 0.4  # measured 0.177 to 0.196
TRIGGER_GAP_GAIN_MIN = 0.2  # the LoRA's trigger gap over the base's: 0.414 to 0.416
BASE_TRIGGER_GAP_MAX = 0.03  # |the base's trigger gap|: at most 0.0127
SPECIFICITY_MIN = 2.0  # trigger-prompt change / unrelated-prompt change: 3.98 to 5.28

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


def subject_images(scene: Scene, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [draw_jittered(scene, rng) for _ in range(IMAGES_PER_SUBJECT)]


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


# -- the LoRA, trained through the entrypoint --------------------------------------------------------


def write_subject_dataset(dataset: Path, seed: int) -> None:
    for offset, (folder, scene) in enumerate(SUBJECTS.items()):
        (dataset / folder).mkdir(parents=True)
        for index, image in enumerate(subject_images(scene, seed + offset)):
            image.save(dataset / folder / f"img{index}.png")
    config = CONFIG_TOML.format(size=SIZE, steps=TRAIN_STEPS, seed=seed)
    (dataset / CONFIG_FILE).write_text(config, encoding="utf-8")


def train_lora(root: Path, base: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> SageMakerDirs:
    """Run `python -m loraflow_training train` in-process on the subjects; the job's directories."""
    from loraflow_training.__main__ import main

    dirs = SageMakerDirs(root, root / "input" / "data" / "dataset", root / "model", root / "output")
    write_subject_dataset(dirs.dataset, seed)
    write_hyperparameters(root, CONFIG_FILE, str(base), "learns")
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
        """Mean prediction MSE on the training images; the same noise for every call."""
        losses = []
        with self.lora(lora):
            cond = self.family.encode_prompts(self.pipe, captions, (SIZE, SIZE))
            for seed, timestep in itertools.product(NOISE_SEEDS, TIMESTEPS):
                noise = torch.randn(self.latents.shape, generator=torch.Generator().manual_seed(seed))
                timesteps = torch.full((len(noise),), timestep)
                noisy = self.scheduler.add_noise(self.latents, noise, cast(torch.IntTensor, timesteps))
                prediction = self.family.predict(self.pipe.unet, noisy, timesteps, cond)
                target = self.target(self.latents, noise, timesteps)
                losses.append(float(torch.mean((prediction - target) ** 2)))
        return sum(losses) / len(losses)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the base predicts: the noise, or (the toy base) the velocity."""
        if self.scheduler.config["prediction_type"] == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, cast(torch.IntTensor, timesteps))
        return noise

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
        for index, scene in enumerate(UNRELATED_SCENES):
            images = subject_images(scene, 100 + index)[:2]
            unrelated.append(self.output_change(scene.caption(), to_latents(self.pipe, images)))
        return sum(trigger) / len(trigger), sum(unrelated) / len(unrelated)

    def trigger_gap(self, lora: bool) -> float:
        """Loss with each image's caption replaced by the other subject's trigger, minus with its own."""
        swapped = [OTHER_TRIGGER[caption] for caption in self.captions]
        return self.denoising_loss(swapped, lora) - self.denoising_loss(self.captions, lora)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Learned:
    base = copy_toy_base(tmp_path_factory.mktemp("learns-base") / "base")
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

    assert abs(base_gap) < BASE_TRIGGER_GAP_MAX, base_gap  # the base barely tells the two words apart
    assert tuned_gap > 0 and tuned_gap - base_gap > TRIGGER_GAP_GAIN_MIN, (base_gap, tuned_gap)


def test_given_trained_lora_when_prompting_trigger_and_unrelated_then_trigger_outputs_change_more(
    learned: Learned,
) -> None:
    trigger, unrelated = learned.trigger_and_unrelated_change()

    assert trigger / unrelated > SPECIFICITY_MIN, (trigger, unrelated)


def test_given_lora_that_learns_when_effect_checked_then_not_flagged_weak(learned: Learned) -> None:
    effect = learned.report["effect"]

    assert not effect["weak"], effect
    assert "WEAK_LORA" not in [warning["code"] for warning in learned.report["warnings"]]
