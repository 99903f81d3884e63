"""Caption encoding in the loop matches the pipelines' own `encode_prompt`; kohya's clip_skip on SD 1.x."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from loraflow_diffusion.families import StableDiffusion15, StableDiffusionXL
from loraflow_diffusion.tiny import build_tiny_sdxl

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

PROMPTS = ["ohwx", "sks dog, a red circle on a blue square"]


@pytest.fixture(scope="module")
def sd(tiny_model: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_model)


def test_given_sd15_captions_when_encoded_then_same_as_the_pipeline(sd: StableDiffusionPipeline) -> None:
    family = StableDiffusion15()

    with torch.no_grad():
        ours = family.encode_prompts(sd, PROMPTS, (64, 64))
        theirs, _ = sd.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)

    assert torch.equal(ours.encoder_hidden_states, theirs)
    assert ours.added_cond_kwargs == {}


def test_given_clip_skip_2_when_encoded_then_penultimate_layer_through_final_norm(
    sd: StableDiffusionPipeline,
) -> None:
    family = StableDiffusion15()
    ids = family.tokenize(sd, PROMPTS)

    with torch.no_grad():
        skipped = family.encode_tokens([sd.text_encoder], ids, clip_skip=2).hidden_states
        last = family.encode_tokens([sd.text_encoder], ids, clip_skip=1).hidden_states
        hidden = sd.text_encoder(ids[0], output_hidden_states=True).hidden_states
        expected = sd.text_encoder.final_layer_norm(hidden[-2])

    assert torch.equal(skipped, expected)
    assert torch.equal(last, sd.text_encoder(ids[0])[0])  # kohya's clip_skip 1 = no skip
    assert not torch.allclose(skipped, last)


def test_given_sdxl_captions_when_encoded_then_same_as_the_pipeline(tmp_path: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path / "sdxl"))
    family = StableDiffusionXL()

    with torch.no_grad():
        ours = family.encode_prompts(pipe, PROMPTS, (64, 48))
        # diffusers annotates `prompt` as str; it takes a list like the SD 1.5 pipeline.
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS,  # type: ignore[arg-type]
            device=torch.device("cpu"),
            do_classifier_free_guidance=False,
        )

    assert torch.equal(ours.encoder_hidden_states, embeds)
    assert torch.equal(ours.added_cond_kwargs["text_embeds"], pooled)
    assert ours.added_cond_kwargs["time_ids"].tolist() == [[48, 64, 0, 0, 48, 64]] * 2  # (h, w) pairs
