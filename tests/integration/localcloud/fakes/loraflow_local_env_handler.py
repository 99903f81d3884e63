"""Reads its setting at import (cold start), as loraflow's handlers do; only the registry imports it."""

import os

GREETING_AT_COLD_START = os.environ.get("GREETING")
FUNCTION_NAME_AT_COLD_START = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")


def handler(event, context):
    return {
        "greeting": GREETING_AT_COLD_START,
        "function_at_cold_start": FUNCTION_NAME_AT_COLD_START,
        "greeting_now": os.environ.get("GREETING"),
        "function": context.function_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
    }
