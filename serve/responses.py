"""The gateway's answers' shapes: OpenAI-style error bodies and JSON any client can read.

Every error is ``{"error": {"message", "type", "param", "code"}}`` built from the
:class:`~lorabay.hub.errors.LorabayError` raised (``http_status``, ``code``), JSON with
every non-ASCII character escaped (a lone surrogate a client sent must not break the
answer).
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from lorabay.hub.errors import LorabayError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
}
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate (``"\\ud800"``) from a client, echoed
    in an error message, cannot be encoded as UTF-8 and would turn the answer into a
    plain-text 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, code: str | None, param: str | None = None):
    error_type = ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return AsciiJSONResponse(body, status_code=status, headers=headers)


def lorabay_error_response(error: LorabayError) -> JSONResponse:
    response = error_response(
        error.http_status, str(error), error.code, getattr(error, "param", None)
    )
    if getattr(error, "closes_connection", False):
        # The body was not read to its end (too large, stalled): what the client sends
        # next on this connection is not a request. Closed after this answer.
        response.headers["connection"] = "close"
    return response
