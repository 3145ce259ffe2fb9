"""The answers of a cloud that fails (``EmulatorState.fail``), each in its own error shape.

Bedrock answers AWS's JSON error with ``x-amzn-ErrorType``; Vertex Google's error document, except
for an overloaded model, which it reports in the Anthropic API's envelope with 529 (as the Anthropic
API does for every error).
"""

from __future__ import annotations

from aiohttp import web

_BEDROCK = {
    429: ("ThrottlingException", "Too many requests, please wait before trying again."),
    503: ("ServiceUnavailableException", "Bedrock is unable to process your request."),
    529: ("ServiceUnavailableException", "The model is overloaded. Try again later."),
}
_GOOGLE = {
    429: ("RESOURCE_EXHAUSTED", "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests."),
    503: ("UNAVAILABLE", "The service is currently unavailable."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}
_ANTHROPIC = {
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    529: ("overloaded_error", "Overloaded"),
}


def failure(kind: str, status: int) -> web.Response:
    """What a ``kind`` upstream answers when it fails with ``status``."""
    if kind == "bedrock":
        error_type, message = _BEDROCK.get(status, ("InternalServerException", "Internal server error."))
        headers = {"x-amzn-ErrorType": error_type, "x-amzn-RequestId": "emulator-failure"}
        return web.json_response({"message": message}, status=status, headers=headers)
    if kind == "vertex" and status != 529:
        google_status, message = _GOOGLE.get(status, ("INTERNAL", "Internal error encountered."))
        return web.json_response(
            {"error": {"code": status, "message": message, "status": google_status}}, status=status
        )
    error_type, message = _ANTHROPIC.get(status, ("api_error", "Internal server error"))
    return web.json_response(
        {"type": "error", "error": {"type": error_type, "message": message}}, status=status
    )
