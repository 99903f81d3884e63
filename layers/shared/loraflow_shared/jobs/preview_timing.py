"""How long previews may take, derived from one stack setting (`PreviewTimeoutSeconds`).

The state machine waits for the preview callback at most `PreviewTimeoutSeconds`. Within that, a
request may wait in the endpoint's queue (scale-from-zero, other jobs' previews) for `RequestTTLSeconds`
and then run for `InvocationTimeoutSeconds` (the model download included: the validation budget in
`loraflow_shared.dataset.preview_budget` keeps every accepted config inside it), and the result's
notification needs a moment to arrive. So the callback never gives up on a request that can still
succeed, and a request never outlives the task that waits for it (AWS's defaults, 900 s / 6 h, did not
agree with the 3600 s callback).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraflow_shared.dataset.preview_budget import PREVIEW_INVOCATION_TIMEOUT_S

NOTIFICATION_MARGIN_S = 120  # endpoint -> SNS -> callback Lambda -> SendTaskSuccess
# InvokeEndpointAsync's RequestTTLSeconds range (SageMaker Runtime API reference).
MIN_REQUEST_TTL_S = 60
MAX_REQUEST_TTL_S = 21_600
MIN_PREVIEW_TIMEOUT_S = PREVIEW_INVOCATION_TIMEOUT_S + MIN_REQUEST_TTL_S + NOTIFICATION_MARGIN_S
MAX_PREVIEW_TIMEOUT_S = PREVIEW_INVOCATION_TIMEOUT_S + MAX_REQUEST_TTL_S + NOTIFICATION_MARGIN_S


@dataclass(frozen=True)
class PreviewTimeouts:
    invocation_s: int  # InvokeEndpointAsync's InvocationTimeoutSeconds
    request_ttl_s: int  # InvokeEndpointAsync's RequestTTLSeconds


def preview_timeouts(total_s: int) -> PreviewTimeouts:
    """The two InvokeEndpointAsync limits that fit in a callback wait of `total_s` seconds."""
    if not MIN_PREVIEW_TIMEOUT_S <= total_s <= MAX_PREVIEW_TIMEOUT_S:
        raise ValueError(
            f"the preview timeout must be {MIN_PREVIEW_TIMEOUT_S}..{MAX_PREVIEW_TIMEOUT_S} s, not {total_s}"
        )
    ttl = total_s - PREVIEW_INVOCATION_TIMEOUT_S - NOTIFICATION_MARGIN_S
    return PreviewTimeouts(invocation_s=PREVIEW_INVOCATION_TIMEOUT_S, request_ttl_s=ttl)


# A generation (`POST /jobs/{job_id}/generations`) waits in the endpoint's queue at most an hour: a user
# who asked for pictures is not left waiting for the six hours a training job's previews may.
GENERATION_TIMEOUTS = PreviewTimeouts(invocation_s=PREVIEW_INVOCATION_TIMEOUT_S, request_ttl_s=3600)
# After this, a PENDING generation can no longer succeed: it is shown (and counted) as FAILED.
GENERATION_EXPIRY_S = (
    GENERATION_TIMEOUTS.invocation_s + GENERATION_TIMEOUTS.request_ttl_s + NOTIFICATION_MARGIN_S
)
