"""Does the LoRA change anything? The standard check: render the training prompts at fixed seeds with
the adapters enabled and disabled, and measure how far the images moved (mean absolute difference of
pixels in [0, 1]). A LoRA below the threshold is still delivered, with a `WEAK_LORA` warning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from loraflow_diffusion.families import SupportedPipeline, family_of
from loraflow_shared.errors import ErrorCode, Problem
from pydantic import BaseModel, ConfigDict, computed_field

# Mean absolute pixel change (0-1 scale) under which the LoRA counts as having no effect: one grey level
# (1/255) on average, below what anyone sees. Measured on the tiny SD pipeline (64 px, 4 steps, seed 0,
# 4 training prompts; the change grows linearly with the learning rate): a zero-initialised LoRA gives
# exactly 0; LoRAs trained like the entrypoint test (12 steps, dim 4, alpha 2, UNet + text encoder) give
# 0.025 at lr 1e-2 (UNet only: 0.022), 0.0027 at lr 1e-3, ~0.0002 at lr 1e-4, ~2e-5 at lr 1e-5. So the
# threshold sits 6x below a trained tiny LoRA and far above an untrained one. test_training_learns' LoRA
# (300 steps, lr 1e-3): 0.061-0.386 over 3 runs on the toy world's base; 0.105-0.131 over 12 runs on the
# stand-in base it fitted before, whose 100-step variant gave 0.089 at lr 1e-2, 0.024 at 1e-4, 0.0023 at
# 1e-5 (weak).
# (Not measured on a real SD model here: no downloads.)
WEAK_LORA_THRESHOLD = 1 / 255
MAX_PROMPTS = 4  # distinct training prompts rendered: the check runs after every training, keep it cheap


class EffectReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean_abs_difference: float  # over all prompts, pixels and channels (0-1 scale)
    per_prompt: dict[str, float]
    threshold: float
    steps: int
    resolution: tuple[int, int]  # (width, height)
    seed: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def weak(self) -> bool:
        return self.mean_abs_difference < self.threshold

    def warning(self) -> Problem | None:
        """The `WEAK_LORA` warning for the job, when the effect is negligible."""
        if not self.weak:
            return None
        return Problem(
            code=ErrorCode.WEAK_LORA,
            path="",
            message=(
                f"the LoRA barely changes images of the training prompts (mean pixel change "
                f"{self.mean_abs_difference:.2g} < {self.threshold:g}): train longer or with a higher "
                "learning_rate, or check the captions carry the trigger word"
            ),
        )


def lora_effect(
    pipe: SupportedPipeline,
    prompts: Sequence[str],
    seed: int,
    steps: int,
    resolution: tuple[int, int],
    threshold: float = WEAK_LORA_THRESHOLD,
) -> EffectReport:
    """Render up to `MAX_PROMPTS` distinct `prompts` with and without the LoRA (same seeds) and compare.

    The pipeline's components are moved to the pipeline's execution device first (training may have
    moved the frozen encoders off it) and left there; the adapters are enabled again afterwards.
    """
    chosen = list(dict.fromkeys(prompts))[:MAX_PROMPTS]
    if not chosen:
        raise ValueError("lora_effect needs at least one prompt")
    device = family_of(pipe).denoiser(pipe).device
    pipe.to(device)
    with _inference_mode(pipe):
        pipe.disable_lora()
        try:
            base = _render(pipe, chosen, seed, steps, resolution)
        finally:
            pipe.enable_lora()
        with_lora = _render(pipe, chosen, seed, steps, resolution)
    differences = np.abs(with_lora - base).mean(axis=(1, 2, 3))
    return EffectReport(
        mean_abs_difference=float(differences.mean()),
        per_prompt={prompt: float(value) for prompt, value in zip(chosen, differences, strict=True)},
        threshold=threshold,
        steps=steps,
        resolution=resolution,
        seed=seed,
    )


def _render(
    pipe: SupportedPipeline, prompts: list[str], seed: int, steps: int, resolution: tuple[int, int]
) -> np.ndarray:
    width, height = resolution
    # One generator per prompt, seeded alike for both renders: the only difference is the LoRA.
    generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(
        # By name: not every pipeline takes it first (FLUX.2 klein's first is `image`). A copy: a pipeline may
        # rewrite the list it is given (ZImagePipeline writes its chat-templated prompts into it).
        prompt=list(prompts),
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=generators,
        output_type="np",
    ).images
    # A black (NaN) render counts as black, not as "no difference".
    return np.nan_to_num(np.asarray(images, dtype=np.float64))


@contextmanager
def _inference_mode(pipe: SupportedPipeline) -> Iterator[None]:
    """Eval mode and no autograd while rendering; each component's train/eval mode is restored after."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, was_training in zip(modules, training, strict=True):
            module.train(was_training)
