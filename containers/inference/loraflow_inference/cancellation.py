"""Stop a render whose job was cancelled: SageMaker cannot cancel an async request, so the request
names an S3 object (`cancel_s3_uri`) that job control writes, and the renderer looks for it before each
prompt and, at most every `POLL_INTERVAL_S`, between denoising steps. The GPU is free within seconds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from loraflow_diffusion import s3_transfer
from loraflow_shared.errors import ErrorCode, LoraflowError

POLL_INTERVAL_S = 5.0
logger = logging.getLogger(__name__)


class RenderCancelled(LoraflowError):
    def __init__(self, job_id: str) -> None:
        super().__init__(ErrorCode.CANCELLED, f"job {job_id} was cancelled: its previews were not rendered")


class CancellationCheck:
    def __init__(
        self,
        job_id: str,
        cancel_uri: str | None,
        exists: Callable[[str], bool] = s3_transfer.exists,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._job_id = job_id
        self._uri = cancel_uri
        self._exists = exists
        self._clock = clock
        self._last_poll = -POLL_INTERVAL_S

    def raise_if_cancelled(self, force: bool = True) -> None:
        """Poll now (`force`) or when POLL_INTERVAL_S passed; a failed poll is logged, not fatal."""
        if self._uri is None or (not force and self._clock() - self._last_poll < POLL_INTERVAL_S):
            return
        self._last_poll = self._clock()
        try:
            cancelled = self._exists(self._uri)
        except Exception:
            logger.warning("cannot check %s for a cancellation", self._uri, exc_info=True)
            return
        if cancelled:
            raise RenderCancelled(self._job_id)

    def step_callback(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """diffusers' `callback_on_step_end`: polls between steps (the exception ends the render)."""
        self.raise_if_cancelled(force=False)
        return kwargs
