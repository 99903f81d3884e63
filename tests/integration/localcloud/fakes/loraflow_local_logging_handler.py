"""Logs as loraflow's handlers do: a Powertools Logger built at import (cold start), plus a print."""

import time

from aws_lambda_powertools import Logger

logger = Logger(service="loraflow-local-log-test")


def handler(event, context):
    for index in range(event.get("lines", 1)):
        logger.info("working", marker=event["marker"], index=index)
        time.sleep(event.get("pause_s", 0))
    print(f"printed by {event['marker']}")
    return {"ok": True}
