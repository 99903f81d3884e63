"""Load a base model from any reference loraflow accepts, as the right pipeline class for its family.

References: a local diffusers folder; a local `.safetensors`/`.ckpt` single file; `s3://bucket/prefix/`
(a diffusers folder) or `s3://bucket/key.safetensors|.ckpt`, downloaded once into the cache; otherwise a
Hugging Face model id. Every failure becomes one `MODEL_LOAD_FAILED` naming the reference and the reason.

A single file (original LDM layout) carries no configs. With a diffusers config folder beside it,
`<name>.config/` (see `single_file`; on S3 the `<name>.config/` prefix beside the object), it loads offline
and that folder's `model_index.json` names the family. Without one, diffusers recognises an SD 1.x/2.x or
SDXL checkpoint by its keys and fetches the matching configs from the Hugging Face Hub (cached after).

The family (SD 1.x/2.x or SDXL) is known before any weight is read: from `model_index.json` (the folder's,
the Hub's or the config folder's) or from the checkpoint's keys. A caller that expects one family (the
config's `sdxl` key) is told of a mismatch then, not after loading gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from loraflow_shared.base_models import parse_hub_model
from loraflow_shared.errors import ErrorCode, LoraflowError
from safetensors import safe_open

from loraflow_diffusion import s3_transfer, single_file
from loraflow_diffusion.families import (
    ModelFamily,
    SupportedPipeline,
    family_for_checkpoint_keys,
    family_for_class_name,
    family_named,
    supported_class_names,
)
from loraflow_diffusion.single_file import SINGLE_FILE_SUFFIXES

_MAX_REASON_CHARS = 400  # the whole failure file must fit SageMaker's 1 KiB FailureReason


logger = logging.getLogger(__name__)


class _Unloadable(Exception):
    """A reason, worded for the user, why a reference cannot be loaded."""


class _FamilyMismatch(Exception):
    """The model is of another family than the caller (the training config) said."""

    def __init__(self, expected: ModelFamily, found: ModelFamily) -> None:
        super().__init__(f"expected {expected.name}, found {found.name}")
        self.expected, self.found = expected, found


def load_pipeline(
    ref: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path,
    expect_family: str | None = None,
) -> SupportedPipeline:
    """Load `ref` as its family's pipeline on `device`; any failure is one `MODEL_LOAD_FAILED`.

    `expect_family`: the name of the family the config says the model is (`claimed_family`), None to
    detect; a model of another family fails before its weights are loaded.
    """
    expected = family_named(expect_family) if expect_family is not None else None
    try:
        pipe = _load(ref, dtype, cache_dir, expected)
    except _FamilyMismatch as exc:
        raise LoraflowError(ErrorCode.MODEL_LOAD_FAILED, _mismatch_message(ref, exc)) from exc
    except Exception as exc:
        logger.exception("loading base model %r failed", ref)
        raise LoraflowError(
            ErrorCode.MODEL_LOAD_FAILED, f"cannot load base model {ref!r}: {_reason(exc)}"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded base model %r as %s", ref, type(pipe).__name__)
    # Every loader below picks the class from a family, so the pipeline is one of theirs.
    return cast(SupportedPipeline, pipe.to(device))


def _mismatch_message(ref: str, mismatch: _FamilyMismatch) -> str:
    return (
        f"config says {mismatch.expected.config_claim} but {ref!r} is {mismatch.found.description}:"
        f" set {mismatch.found.config_claim}, or leave {mismatch.expected.config_key} out to detect the"
        " model family"
    )


def _checked(family: ModelFamily, expect: ModelFamily | None) -> ModelFamily:
    if expect is not None and family.name != expect.name:
        raise _FamilyMismatch(expect, family)
    return family


def _load(ref: str, dtype: torch.dtype, cache_dir: Path, expect: ModelFamily | None) -> DiffusionPipeline:
    if ref.startswith("s3://"):
        return _load_local(_fetch_from_s3(ref, cache_dir), dtype, cache_dir, expect)
    path = Path(ref).expanduser()
    if path.exists():
        return _load_local(path, dtype, cache_dir, expect)
    if ref.lower().endswith(SINGLE_FILE_SUFFIXES) or ref.startswith(("/", ".", "~")):
        raise _Unloadable("no such file or directory")
    hub = parse_hub_model(ref)  # owner/name, optionally @revision (a Hub model ingest pinned: @<commit>)
    try:
        validate_repo_id(hub.repo if hub is not None else ref)
    except HFValidationError as exc:
        raise _Unloadable("not a local path, an s3:// URI or a Hugging Face model id") from exc
    repo, revision = (hub.repo, hub.revision) if hub is not None else (ref, None)
    return _load_diffusers(
        repo, dtype, expect, cache_dir=cache_dir, local_files_only=_hub_offline(), revision=revision
    )


def _load_local(
    path: Path, dtype: torch.dtype, cache_dir: Path, expect: ModelFamily | None
) -> DiffusionPipeline:
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise _Unloadable("the folder has no model_index.json (not a diffusers pipeline)")
        return _load_diffusers(str(path), dtype, expect)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return _load_single_file(path, dtype, cache_dir, expect)
    raise _Unloadable(f"{path.name!r} is neither a diffusers folder nor a .safetensors/.ckpt file")


def _load_diffusers(
    ref: str, dtype: torch.dtype, expect: ModelFamily | None, **hub_kwargs: Any
) -> DiffusionPipeline:
    # model_index.json first: an unsupported family fails before gigabytes of weights are fetched.
    family = _checked(_family_from_model_index(ref, **hub_kwargs), expect)
    return family.pipeline_class.from_pretrained(ref, dtype=dtype, **family.load_kwargs, **hub_kwargs)


def _family_from_model_index(ref: str, **hub_kwargs: Any) -> ModelFamily:
    index, _ = DiffusionPipeline.load_config(ref, return_unused_kwargs=True, **hub_kwargs)
    class_name = str(index.get("_class_name", ""))
    family = family_for_class_name(class_name)
    if family is None:
        raise _Unloadable(
            f"pipeline class {class_name!r} is not supported (supported: {supported_class_names()})"
        )
    return family


def _load_single_file(
    path: Path, dtype: torch.dtype, cache_dir: Path, expect: ModelFamily | None
) -> DiffusionPipeline:
    config_dir = single_file.config_dir_for(path)
    if config_dir.is_dir():
        pipe = _load_single_file_with_config(path, config_dir, dtype, expect)
    else:
        pipe = _load_single_file_from_hub_config(path, dtype, cache_dir, expect)
    _require_every_weight(pipe)
    return pipe


def _load_single_file_with_config(
    path: Path, config_dir: Path, dtype: torch.dtype, expect: ModelFamily | None
) -> DiffusionPipeline:
    """The offline path: the configs beside the checkpoint, not its keys, decide the family and shapes."""
    if not (config_dir / "model_index.json").is_file():
        raise _Unloadable(f"the config folder {config_dir.name!r} has no model_index.json")
    family = _checked(_family_from_model_index(str(config_dir)), expect)
    with _naming_unfilled_weights():
        return _single_file_loader(family)(
            str(path), config=str(config_dir), local_files_only=True, dtype=dtype, **family.load_kwargs
        )


def _single_file_loader(family: ModelFamily) -> Callable[..., DiffusionPipeline]:
    """The pipeline's `from_single_file`, for families whose single files it loads (`loads_single_file`)."""
    loader = getattr(family.pipeline_class, "from_single_file", None)
    if loader is None or not family.loads_single_file:
        raise _Unloadable(
            f"{family.description} cannot load from a single file: give its diffusers folder"
            " (model_index.json with its component folders)"
        )
    return cast(Callable[..., DiffusionPipeline], loader)


def _load_single_file_from_hub_config(
    path: Path, dtype: torch.dtype, cache_dir: Path, expect: ModelFamily | None
) -> DiffusionPipeline:
    family = _checked(_single_file_family(path), expect)
    try:
        with _naming_unfilled_weights():
            return _single_file_loader(family)(
                str(path),
                dtype=dtype,
                cache_dir=cache_dir,
                local_files_only=_hub_offline(),
                **family.load_kwargs,
            )
    except LocalEntryNotFoundError as exc:
        config_dir = single_file.config_dir_name(path.name)
        raise _Unloadable(
            "its configs must come from the Hugging Face Hub, which is offline or unreachable and has no"
            f" cached copy: put a diffusers config folder beside it as {config_dir!r}"
        ) from exc


@contextmanager
def _naming_unfilled_weights() -> Iterator[None]:
    # diffusers builds models on the meta device and fills them from the checkpoint; moving a weight the
    # checkpoint did not hold fails with torch's "Cannot copy out of meta tensor".
    try:
        yield
    except NotImplementedError as exc:
        raise _Unloadable(f"the checkpoint lacks weights its config declares ({_reason(exc)})") from exc


def _require_every_weight(pipe: DiffusionPipeline) -> None:
    """diffusers loads a text encoder the checkpoint fills only in part: the rest stays on the meta device."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            unfilled = [param for param, value in component.named_parameters() if value.is_meta]
            if unfilled:
                raise _Unloadable(
                    f"the checkpoint lacks {len(unfilled)} weights of the {name}, e.g. {unfilled[0]!r}"
                )


def _single_file_family(path: Path) -> ModelFamily:
    keys = _checkpoint_keys(path)
    family = family_for_checkpoint_keys(keys)
    if family is None:
        raise _Unloadable(
            "the checkpoint is neither Stable Diffusion 1.x/2.x nor SDXL (unrecognised keys); another model"
            f" loads with its diffusers config folder beside it as {single_file.config_dir_name(path.name)!r}"
        )
    return family


def _checkpoint_keys(path: Path) -> Collection[str]:
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as checkpoint:
            return set(checkpoint.keys())
    # weights_only: a .ckpt is a pickle, and pickles from strangers must not run code.
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise _Unloadable("the .ckpt file holds no state dict")
    return set(state)


def _fetch_from_s3(uri: str, cache_dir: Path) -> Path:
    """Download once: the cache entry, keyed by the URI's hash, appears (by rename) only when complete."""
    entry = cache_dir / f"s3-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    file_name = uri.rstrip("/").rsplit("/", 1)[-1]
    is_single_file = uri.lower().endswith(SINGLE_FILE_SUFFIXES)
    local = entry / file_name if is_single_file else entry
    if entry.exists():
        logger.info("using cached %s from %s", uri, entry)
        return local
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
    try:
        if is_single_file:
            s3_transfer.download_object(uri, staging / file_name)
            _download_config_beside(uri, staging / single_file.config_dir_name(file_name))
        else:
            s3_transfer.download_prefix(uri, staging)
        (staging / "source.json").write_text(json.dumps({"uri": uri}), encoding="utf-8")
        try:
            staging.rename(entry)
        except OSError:
            if not entry.exists():  # not a concurrent download that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _download_config_beside(checkpoint_uri: str, dest: Path) -> None:
    """The optional `<name>.config/` prefix beside an S3 checkpoint (see `single_file`)."""
    config_uri = f"{checkpoint_uri.rsplit('/', 1)[0]}/{dest.name}/"
    try:
        count = s3_transfer.download_prefix(config_uri, dest)
    except FileNotFoundError:
        logger.info("no diffusers config at %s: the checkpoint's keys will decide its configs", config_uri)
        return
    logger.info("downloaded %d config files from %s", count, config_uri)


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _reason(exc: BaseException) -> str:
    """One line: our own reasons as they are, library errors prefixed with their type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = text if isinstance(exc, _Unloadable) else f"{type(exc).__name__}: {text or 'no details'}"
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 1] + "…"
