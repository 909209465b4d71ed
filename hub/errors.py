"""One error hierarchy for lorabay, carrying facts.

Every error a user can cause or meet derives from :class:`LorabayError`. Each
carries the facts as attributes and renders one line that ends with what to do
next (``hint``). The CLI prints ``str(error)`` (traceback only with
``LORABAY_DEBUG=1``); the gateway maps the same types to HTTP status codes with
``http_status`` and OpenAI-style bodies with ``code``.
"""

from __future__ import annotations


class LorabayError(Exception):
    """Base class. ``message`` says what is wrong, ``hint`` the next step."""

    http_status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(LorabayError):
    """Invalid options or recipe. ``problems`` lists every one found, not only the first."""

    def __init__(self, problems: list[str] | str, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        message = "; ".join(self.problems)
        if len(self.problems) > 1:
            message = f"{len(self.problems)} problems: " + message
        super().__init__(message, hint)


class InvalidReference(LorabayError):
    def __init__(self, ref: str, reason: str):
        self.ref = ref
        self.reason = reason
        super().__init__(
            f"invalid reference {ref!r}: {reason}",
            "use name, name:VERSION, name:ALIAS or name@sha256:HEX, e.g. team/summarize:prod",
        )


class AdapterNotFound(LorabayError):
    http_status = 404
    code = "model_not_found"

    def __init__(self, ref: str, hint: str | None = "run `lorabay hub list` to see what exists"):
        self.ref = ref
        super().__init__(f"adapter {ref!r} not found", hint)


class InvalidAdapter(LorabayError):
    """The folder or files offered as an adapter are not acceptable (checked before any write)."""

    def __init__(self, path: str, reason: str, hint: str | None = None):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}", hint)


class DigestMismatch(LorabayError):
    http_status = 502
    code = "adapter_corrupted"

    def __init__(self, path: str, expected: str, actual: str):
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{path}: sha256 mismatch, manifest says {expected}, content is {actual}",
            "the stored copy is damaged; run `lorabay hub verify` and push the adapter again",
        )


class IncompatibleBase(LorabayError):
    code = "incompatible_adapter"

    def __init__(self, adapter: str, base: str, reasons: list[str] | str):
        self.adapter = adapter
        self.base = base
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        super().__init__(
            f"adapter {adapter!r} does not fit base {base!r}: " + "; ".join(self.reasons),
            "train or pick an adapter for this base",
        )


class RegistryUnavailable(LorabayError):
    http_status = 503
    code = "registry_unavailable"

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(
            f"registry {url} is unavailable: {reason}",
            "check --registry / LORABAY_REGISTRY and that the store is reachable",
        )


class Conflict(LorabayError):
    """A compare-and-swap lost too many times, or a write raced with another."""

    http_status = 409
    code = "conflict"


class EngineUnavailable(LorabayError):
    http_status = 503
    code = "engine_unavailable"
