"""The engine's own door: an ASGI middleware that runs inside vLLM's API server.

`lorabay serve` starts vLLM with ``--middleware lorabay.serve.engine_guard.EngineGuard``.
vLLM's API key (``VLLM_API_KEY``) guards only ``/v1``, ``/v2``, ``/inference`` and
``/cohere``; with runtime LoRA updating on it also mounts SageMaker's ``/adapters``
(load a LoRA from any path under any name) and ``/invocations`` (run any adapter),
and ``/generative_scoring``, ``/tokenize``, ``/metrics``, ``/scale_elastic_ep`` answer
anyone. This guard is the second layer behind the engine's private Unix socket:

- every request, on every path, must carry the gateway's bearer token (compared in
  constant time on its sha256, as vLLM does);
- with the token, only the routes the gateway itself uses exist
  (:data:`GATEWAY_ROUTES`); every other path answers 404;
- websockets are refused.

Without a token in its environment the guard refuses everything: it fails closed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

TOKEN_ENV = "VLLM_API_KEY"  # the same secret vLLM's own /v1 check reads

# (method, path) the gateway sends; nothing else is served, whoever asks.
GATEWAY_ROUTES = frozenset(
    {
        ("GET", "/health"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),  # the engine's own counters, for the gateway's diagnostics
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
    }
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class EngineGuard:
    """Pure ASGI middleware (vLLM adds it with ``app.add_middleware(EngineGuard)``)."""

    def __init__(self, app) -> None:
        self.app = app
        token = os.environ.get(TOKEN_ENV, "")
        self._digest = _digest(token) if token else None

    def allows(self, scope) -> tuple[int, str] | None:
        """None when the request may pass; else (status, reason)."""
        headers = dict(scope.get("headers") or [])
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if self._digest is None or scheme.lower() != "bearer":
            return 401, "Unauthorized"
        if not hmac.compare_digest(_digest(given), self._digest):
            return 401, "Unauthorized"
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if (scope.get("method"), path) not in GATEWAY_ROUTES:
            return 404, "Not Found"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets and anything newer: nothing of ours
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        refused = self.allows(scope)
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, reason = refused
        body = json.dumps({"error": reason}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
