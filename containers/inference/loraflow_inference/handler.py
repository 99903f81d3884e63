"""Render a job's previews: each prompt by the base pipeline (cached) alone and with the job's LoRA, same
seed, one PNG each, plus a contact sheet of the pairs, to S3. A generation (`render_base` false) renders
with the LoRA only, at its `lora_scale`, with its negative prompt and guidance.

No HTTP here: `server.py` wraps this for SageMaker. One render at a time per process: a pipeline
with a LoRA applied is shared state, and the LoRA is always unloaded before the next job.
"""

from __future__ import annotations

import gc
import io
import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from loraflow_diffusion import s3_transfer
from loraflow_diffusion.device import pick_device, pick_dtype
from loraflow_diffusion.families import SupportedPipeline, family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_shared.contracts import (
    CONTACT_SHEET_FILE,
    PreviewRequest,
    PreviewResponse,
    PreviewResult,
    base_preview_file,
    preview_file,
)
from loraflow_shared.errors import ErrorCode, LoraflowError
from PIL import Image

from loraflow_inference.cancellation import CancellationCheck, RenderCancelled
from loraflow_inference.contact_sheet import contact_sheet
from loraflow_inference.settings import InferenceSettings

ADAPTER_NAME = "job_lora"
PipelineLoader = Callable[[str], SupportedPipeline]

logger = logging.getLogger(__name__)


class PreviewRenderer:
    def __init__(self, loader: PipelineLoader, max_cached_pipelines: int = 1) -> None:
        self._loader = loader
        self._max_cached = max_cached_pipelines
        self._pipelines: OrderedDict[str, SupportedPipeline] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: InferenceSettings) -> PreviewRenderer:
        device = pick_device()
        dtype = pick_dtype(device, settings.precision)

        def loader(ref: str) -> SupportedPipeline:
            return load_pipeline(ref, device=device, dtype=dtype, cache_dir=settings.model_cache_dir)

        return cls(loader, settings.max_cached_pipelines)

    def render(self, request: PreviewRequest) -> PreviewResponse:
        cancellation = CancellationCheck(request.job_id, request.cancel_s3_uri)
        with self._lock:
            cancellation.raise_if_cancelled()  # queued behind other renders: maybe cancelled meanwhile
            pipe = self.pipeline(request.base_model)
            with tempfile.TemporaryDirectory(prefix="loraflow-lora-") as folder:
                lora_file = _download_lora(request.lora_s3_uri, Path(folder))
                # The base model alone renders before the LoRA is loaded.
                base_images = _render_request(pipe, request, cancellation) if request.render_base else None
                images = self._render_with_lora(pipe, lora_file, request, cancellation)
        return _store(request, images, base_images)

    def pipeline(self, ref: str) -> SupportedPipeline:
        """The cached pipeline for `ref`, loading it (after evicting the least recently used) if needed.

        Not locked by itself: `render` calls it under the renderer's lock.
        """
        if ref in self._pipelines:
            self._pipelines.move_to_end(ref)
            return self._pipelines[ref]
        while len(self._pipelines) >= self._max_cached:
            self._evict(next(iter(self._pipelines)))
        pipe = self._loader(ref)  # raises MODEL_LOAD_FAILED
        self._pipelines[ref] = pipe
        return pipe

    @property
    def cached_models(self) -> list[str]:
        """References of the loaded pipelines, least recently used first."""
        return list(self._pipelines)

    def _evict(self, ref: str) -> None:
        del self._pipelines[ref]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _render_with_lora(
        self,
        pipe: SupportedPipeline,
        lora_file: Path,
        request: PreviewRequest,
        cancellation: CancellationCheck | None = None,
    ) -> list[Image.Image]:
        try:
            try:
                pipe.load_lora_weights(
                    str(lora_file.parent), weight_name=lora_file.name, adapter_name=ADAPTER_NAME
                )
            except Exception as exc:
                what = f"LoRA {request.lora_s3_uri} does not fit base model {request.base_model!r}"
                raise _preview_failed(what, exc) from exc
            if request.lora_scale != 1.0:
                try:
                    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[request.lora_scale])
                except Exception as exc:
                    raise _preview_failed(f"cannot weight the LoRA by {request.lora_scale}", exc) from exc
            return _render_request(pipe, request, cancellation)
        finally:
            self._unload_lora(pipe, request.base_model)

    def _unload_lora(self, pipe: SupportedPipeline, ref: str) -> None:
        try:
            pipe.unload_lora_weights()
        except Exception:
            # A pipeline in an unknown state must not serve the next job.
            logger.exception("unloading the LoRA failed: dropping pipeline %r", ref)
            self._evict(ref)


def _store(
    request: PreviewRequest, images: list[Image.Image], base_images: list[Image.Image] | None
) -> PreviewResponse:
    """Upload the pictures (and, with the base model's, those and their contact sheet) under the request's
    `output_s3_prefix`."""
    prefix = request.output_s3_prefix.rstrip("/") + "/"  # `.../previews` and `.../previews/` alike
    previews = []
    for index, (prompt, image) in enumerate(zip(request.prompts, images, strict=True)):
        uri = prefix + preview_file(index)
        _upload_png(image, uri)
        base_uri = None
        if base_images is not None:
            base_uri = prefix + base_preview_file(index)
            _upload_png(base_images[index], base_uri)
        previews.append(PreviewResult(prompt=prompt, s3_uri=uri, base_s3_uri=base_uri))
    if base_images is None:
        return PreviewResponse(job_id=request.job_id, previews=previews)
    sheet_uri = prefix + CONTACT_SHEET_FILE
    _upload_png(contact_sheet(list(zip(request.prompts, base_images, images, strict=True))), sheet_uri)
    return PreviewResponse(job_id=request.job_id, previews=previews, contact_sheet_s3_uri=sheet_uri)


def _render_request(
    pipe: SupportedPipeline, request: PreviewRequest, cancellation: CancellationCheck | None
) -> list[Image.Image]:
    return render_prompts(
        pipe,
        request.prompts,
        request.steps,
        request.resolution,
        request.seed,
        request.clip_skip,
        cancellation,
        negative_prompt=request.negative_prompt,
        guidance=request.guidance,
    )


def render_prompts(
    pipe: SupportedPipeline,
    prompts: list[str],
    steps: int,
    resolution: int,
    seed: int,
    clip_skip: int | None = None,
    cancellation: CancellationCheck | None = None,
    *,
    negative_prompt: str | None = None,
    guidance: float | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed + i on a CPU generator (same picture on any device).

    With a `cancellation`, a cancelled job stops the render before the next prompt or step. Without a
    negative prompt or guidance, the family's own sampling (`preview_arguments`)."""
    images = []
    step_callback = {"callback_on_step_end": cancellation.step_callback} if cancellation else {}
    for index, prompt in enumerate(prompts):
        if cancellation is not None:
            cancellation.raise_if_cancelled()
        try:
            result = pipe(
                **_prompt_arguments(pipe, prompt, resolution, clip_skip, negative_prompt, guidance),
                num_inference_steps=steps,
                height=resolution,
                width=resolution,
                generator=torch.Generator("cpu").manual_seed(seed + index),
                **step_callback,
            )
        except RenderCancelled:
            raise
        except Exception as exc:
            raise _preview_failed(f"rendering prompt {index} ({prompt!r}) failed", exc) from exc
        images.append(result.images[0])
    return images


def _prompt_arguments(
    pipe: SupportedPipeline,
    prompt: str,
    resolution: int,
    clip_skip: int | None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
) -> dict[str, object]:
    """The prompt as text, or, with kohya's `clip_skip` > 1 on SD 1.x, as embeddings encoded the way the
    trainer encoded its captions (diffusers' own `clip_skip` reaches for `text_encoder.text_model`, which
    transformers 5 no longer has; the negative prompt, empty unless given, is skipped alike, as A1111
    does); with the family's own call arguments and the request's (`sampling_arguments`)."""
    family = family_of(pipe)
    arguments = family.sampling_arguments(pipe, negative_prompt, guidance)
    if clip_skip is None or clip_skip <= 1 or not family.supports_clip_skip:
        return {"prompt": prompt, **arguments}
    negative = str(arguments.pop("negative_prompt", ""))
    with torch.no_grad():
        cond = family.encode_prompts(pipe, [prompt, negative], (resolution, resolution), clip_skip)
    embeds = cond.encoder_hidden_states
    return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:], **arguments}


def _download_lora(uri: str, folder: Path) -> Path:
    name = uri.rsplit("/", 1)[-1]
    if not name.endswith(".safetensors"):
        raise LoraflowError(ErrorCode.PREVIEW_FAILED, f"LoRA URI {uri} does not name a .safetensors file")
    try:
        return s3_transfer.download_object(uri, folder / name)
    except Exception as exc:
        raise _preview_failed(f"cannot download LoRA {uri}", exc) from exc


def _upload_png(image: Image.Image, uri: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    try:
        s3_transfer.upload_bytes(buffer.getvalue(), uri, content_type="image/png")
    except Exception as exc:
        raise _preview_failed(f"cannot upload preview to {uri}", exc) from exc


def _preview_failed(what: str, exc: Exception) -> LoraflowError:
    logger.error("%s", what, exc_info=exc)
    lines = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return LoraflowError(ErrorCode.PREVIEW_FAILED, f"{what}: {detail}")
