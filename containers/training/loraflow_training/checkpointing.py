"""Training-state checkpoints for resuming after a spot interruption.

The store's folder (``$SM_CHECKPOINT_DIR/state/``: SageMaker copies ``/opt/ml/checkpoints`` to S3 while
the job runs and restores it into the next attempt after a spot interruption) holds::

    step-00000200/state.pt        torch.save of the state dict (LoRA weights, optimizer, schedule, RNGs, ...)
    step-00000200/manifest.json   step, state.pt's size and, when the store has one, the run's identity

A save writes a ``.partial-*`` folder and renames it into place, so a crash mid-save leaves only a
partial folder, which is ignored and removed by the next save. The newest ``keep`` (2) are kept.
``latest()`` skips a checkpoint whose files are missing, truncated (a copy cut short) or unreadable,
falling back to the one before, and refuses, with ``CheckpointMismatch``, one that belongs to another
LoRA (rank, alpha, targets, base model, config). State is loaded with ``torch.load(weights_only=True)``:
``save`` refuses values that such a load would reject, so a checkpoint that saved can always be resumed.
One process writes (the main one); any number may read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, LoraflowError
from pydantic import BaseModel, ConfigDict, ValidationError

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
DEFAULT_KEEP = 2
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8,})$")
_PARTIAL_PREFIX = ".partial-"
_TRASH_PREFIX = ".trash-"
# What torch.load(weights_only=True) rebuilds: tensors (parameters too) and these exact types. Not their
# subclasses (IntEnum, defaultdict, namedtuple) nor NumPy scalars, which a float check would let through.
_SAFE_LEAF_TYPES = frozenset(
    {bool, int, float, complex, str, bytes, type(None), torch.Size, torch.dtype, torch.device}
)
_SAFE_MAPPINGS = frozenset({dict, OrderedDict})
_SAFE_COLLECTIONS = frozenset({list, tuple, set})

logger = logging.getLogger(__name__)


class CheckpointIdentity(BaseModel):
    """What a checkpoint must match to be resumed: the LoRA's shape and what it was trained from."""

    model_config = ConfigDict(frozen=True)

    network_dim: int
    network_alpha: float
    target_modules: tuple[str, ...]  # sorted
    base_model: str
    config_hash: str  # `config_hash(config)`

    @classmethod
    def for_run(
        cls, config: TrainingConfig, base_model: str, target_modules: Iterable[str]
    ) -> CheckpointIdentity:
        return cls(
            network_dim=config.network_dim,
            network_alpha=config.network_alpha,
            target_modules=tuple(sorted(set(target_modules))),
            base_model=base_model,
            config_hash=config_hash(config),
        )


def config_hash(config: TrainingConfig) -> str:
    """sha256 of the config as applied, minus the ``[loraflow]`` preview settings (not training state)."""
    return hashlib.sha256(config.model_dump_json(exclude={"loraflow"}).encode()).hexdigest()


class CheckpointManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: Literal[1] = 1
    step: int
    state_bytes: int  # size of state.pt: a shorter file is a copy cut short
    saved_at: str  # ISO-8601 UTC
    identity: CheckpointIdentity | None = None


class CheckpointMismatch(LoraflowError):
    """A usable checkpoint of another LoRA: resuming from it would mix two trainings."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TRAINING_FAILED, message)


class CheckpointStore:
    """Atomic save / newest-valid load of training state dicts, keeping the newest ``keep``."""

    def __init__(
        self, directory: Path, identity: CheckpointIdentity | None = None, keep: int = DEFAULT_KEEP
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = directory
        self.identity = identity
        self.keep = keep

    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step`` and return its folder.

        Checkpoints of later steps are removed: they belong to a timeline this run has left (it resumed
        from an earlier one because they were unreadable or another run's).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        check_loadable(state)
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{step:08d}-", dir=self.directory))
        try:
            state_bytes = _write_state(partial / STATE_FILE, state)
            manifest = CheckpointManifest(
                step=step,
                state_bytes=state_bytes,
                saved_at=datetime.now(UTC).isoformat(timespec="seconds"),
                identity=self.identity,
            )
            _write_synced(partial / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
            final = self.directory / f"step-{step:08d}"
            if final.exists():
                _discard(final)  # the same step saved again after a resume
            os.rename(partial, final)  # atomic within one filesystem
            _sync_directory(self.directory)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self._prune(step)
        return final

    def latest(self, map_location: str | torch.device = "cpu") -> tuple[int, dict[str, Any]] | None:
        """The newest readable checkpoint as ``(step, state)``, or None when there is none."""
        for step, folder in reversed(self.checkpoints()):
            manifest = _read_manifest(folder)
            if manifest is None or manifest.step != step:
                continue
            state = _read_state(folder / STATE_FILE, manifest.state_bytes, map_location)
            if state is None:
                continue
            self._check_identity(manifest, folder)
            return step, state
        return None

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete-looking checkpoint folders as ``(step, folder)``, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def _check_identity(self, manifest: CheckpointManifest, folder: Path) -> None:
        if self.identity is None or manifest.identity == self.identity:
            return
        if manifest.identity is None:
            detail = "it records no LoRA identity"
        else:
            saved, ours = manifest.identity.model_dump(), self.identity.model_dump()
            detail = "; ".join(
                f"{key} {saved[key]!r} there, {ours[key]!r} in this run"
                for key in ours
                if saved[key] != ours[key]
            )
        raise CheckpointMismatch(
            f"the checkpoint at step {manifest.step} ({folder}) was saved for a different LoRA ({detail}); "
            "refusing to resume from it: remove it or give this run its own checkpoint location"
        )

    def _prune(self, saved_step: int) -> None:
        """Remove leftovers of crashed saves, checkpoints after ``saved_step``, and all but the newest."""
        for entry in self.directory.iterdir():
            if entry.name.startswith((_PARTIAL_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)
        kept = [(step, folder) for step, folder in self.checkpoints() if step <= saved_step]
        stale = [folder for step, folder in self.checkpoints() if step > saved_step]
        for folder in stale + [folder for _, folder in kept[: -self.keep]]:
            _discard(folder)


def check_loadable(state: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would refuse."""
    kind = type(state)
    if kind in _SAFE_MAPPINGS:
        for key, value in state.items():
            check_loadable(key, f"{where} key {key!r}")
            check_loadable(value, f"{where}[{key!r}]")
    elif kind in _SAFE_COLLECTIONS:
        for index, value in enumerate(state):
            check_loadable(value, f"{where}[{index}]")
    elif not (kind in _SAFE_LEAF_TYPES or isinstance(state, torch.Tensor)):
        raise TypeError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}, which a weights-only checkpoint load "
            "refuses: store it as a tensor, number, string, or a list/tuple/dict of them"
        )


def global_rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's and (when present) every CUDA device's RNG state, in loadable types."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: Mapping[str, Any]) -> None:
    """Undo `global_rng_state`: the same draws follow as after the save."""
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_state(path: Path, state: Mapping[str, Any]) -> int:
    with path.open("wb") as file:
        torch.save(dict(state), file)
        file.flush()
        os.fsync(file.fileno())
        return file.tell()


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _discard(folder: Path) -> None:
    """Rename first, so that a crash mid-removal never leaves a partial folder under a checkpoint name."""
    trash = folder.with_name(f"{_TRASH_PREFIX}{folder.name}-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _read_manifest(folder: Path) -> CheckpointManifest | None:
    try:
        return CheckpointManifest.model_validate_json((folder / MANIFEST_FILE).read_bytes())
    except (OSError, ValidationError) as exc:
        logger.warning("skipping checkpoint %s: unreadable manifest (%s)", folder, exc)
        return None


def _read_state(path: Path, expected_bytes: int, map_location: str | torch.device) -> dict[str, Any] | None:
    try:
        size = path.stat().st_size
        if size != expected_bytes:
            logger.warning("skipping checkpoint %s: %d bytes, %d expected", path.parent, size, expected_bytes)
            return None
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a damaged file fails inside pickle/zip in many ways: each means "skip it"
        logger.warning(
            "skipping checkpoint %s: unreadable state (%s: %s)", path.parent, type(exc).__name__, exc
        )
        return None
    if not isinstance(loaded, dict):
        logger.warning(
            "skipping checkpoint %s: state is a %s, not a dict", path.parent, type(loaded).__name__
        )
        return None
    return loaded
