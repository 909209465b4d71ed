"""Serving's errors: the engine, the gateway, API keys and request bodies.

They derive from :class:`lorabay.hub.errors.LorabayError` (the CLI prints each as one
line, the gateway maps each to an HTTP status and an OpenAI-style body); the registry's
errors stay in ``hub/errors.py``, the one module every package may import.
"""

from __future__ import annotations

from lorabay.hub.errors import LorabayError


class EngineUnavailable(LorabayError):
    http_status = 503
    code = "engine_unavailable"


class Unauthorized(LorabayError):
    """No API key, or one the gateway does not know."""

    http_status = 401
    code = "invalid_api_key"

    def __init__(self, reason: str = "missing or unknown API key"):
        self.reason = reason
        super().__init__(reason, "send `Authorization: Bearer <key>` with a key from --api-keys")


class InvalidRequest(LorabayError):
    """A request body the gateway refuses before it reaches the engine."""

    def __init__(self, message: str, param: str | None = None, http_status: int = 400):
        self.param = param
        self.http_status = http_status
        super().__init__(message)


class EngineStartFailed(LorabayError):
    """The vLLM engine exited, or never answered, while starting; ``output`` is its own error."""

    http_status = 503
    code = "engine_unavailable"

    def __init__(self, exit_code: int | None, output: str, log_path: str | None = None):
        self.exit_code = exit_code
        self.output = output
        self.log_path = log_path
        how = f"exited with code {exit_code}" if exit_code is not None else "did not start"
        indented = "\n".join("    " + line for line in output.splitlines())
        super().__init__(
            f"the vLLM engine {how} before it was ready; its error:\n{indented}\n",
            f"fix the cause above; the whole engine log is {log_path}"
            if log_path
            else "fix the cause above",
        )


class AdapterLoadFailed(LorabayError):
    """The engine refused to load an adapter that passed verification (its own reason)."""

    http_status = 502
    code = "adapter_load_failed"

    def __init__(self, adapter: str, reason: str):
        self.adapter = adapter
        self.reason = reason
        super().__init__(
            f"the engine could not load adapter {adapter!r}: {reason}",
            "check the adapter with `lorabay hub verify` and its rank against --max-lora-rank",
        )
