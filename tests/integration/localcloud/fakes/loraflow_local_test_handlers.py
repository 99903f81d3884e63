"""Lambda handlers for the local cloud's runtime tests, imported by the in-process registry."""

EVENTS = []


def echo(event, context):
    return {"event": event, "function": context.function_name}


def record(event, context):
    EVENTS.append(event)
    return None


class InvalidDatasetError(Exception):
    pass


def fail(event, context):
    raise InvalidDatasetError("dataset 0001 has no config")


def partial_batch(event, context):
    """Fails the records whose body is "bad", as a ReportBatchItemFailures consumer does."""
    EVENTS.append(event)
    failures = [{"itemIdentifier": r["messageId"]} for r in event["Records"] if r["body"] == "bad"]
    return {"batchItemFailures": failures}


def proxy(event, context):
    EVENTS.append(event)
    return {
        "statusCode": 201,
        "headers": {"content-type": "application/json"},
        "multiValueHeaders": {"set-cookie": ["a=1", "b=2"]},
        "body": '{"ok": true}',
    }


def broken_proxy(event, context):
    return {"body": "no status code"}
