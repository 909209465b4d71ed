"""The base of lorabay's error hierarchy, and the registry's own errors.

Every error a user can cause or meet derives from :class:`LorabayError`. Each
carries the facts as attributes and renders one line that ends with what to do
next (``hint``). The CLI prints ``str(error)`` (traceback only with
``LORABAY_DEBUG=1``); the gateway maps the same types to HTTP status codes with
``http_status`` and OpenAI-style bodies with ``code``.

The base lives here because ``hub`` is the one package every other may import
(``cli -> serve, train -> hub``; the ``lorabay`` namespace itself has no module to
hold it). Each layer's own errors live next to its code and derive from these:
training's in ``lorabay.train`` (``train/launch.py``, ``train/label/``), serving's in
``lorabay.serve.errors``. What follows the base is the registry's: references,
adapters, stores, the Hugging Face Hub, signatures.
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
        shown = ref if len(ref) <= 100 else f"{ref[:100]}... ({len(ref)} characters)"
        super().__init__(
            f"invalid reference {shown!r}: {reason}",
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


class UntrustedAdapter(LorabayError):
    """The trust policy (``serve --trust``) refuses an adapter: no valid signature by a key
    it allows for that name. ``kind``: no_rule, unsigned, unknown_signer or bad_signature."""

    http_status = 403
    code = "untrusted_adapter"

    def __init__(self, adapter: str, kind: str, reason: str, hint: str | None = None):
        self.adapter = adapter
        self.kind = kind
        self.reason = reason
        super().__init__(
            f"adapter {adapter!r} is not trusted: {reason}",
            hint or "sign it with a key the trust policy allows (`lorabay hub sign REF --key KEY`)",
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


class DamagedRecord(LorabayError):
    """A stored manifest, alias table or blob cannot be read as what it should be."""

    http_status = 502
    code = "adapter_corrupted"

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(
            f"{where} is damaged: {reason}",
            "run `lorabay hub verify` to list every damaged record",
        )


class MissingBlob(LorabayError):
    """A manifest names a blob the store does not hold (deleted by hand, or a bad copy)."""

    http_status = 502
    code = "adapter_corrupted"

    def __init__(self, path: str, digest: str):
        self.path = path
        self.digest = digest
        super().__init__(
            f"{path}: the store has no blob {digest}",
            "run `lorabay hub verify`, then push the adapter again",
        )


class YankedVersion(LorabayError):
    """An operation that needs a servable version was given a yanked one."""

    code = "adapter_yanked"

    def __init__(self, ref: str):
        self.ref = ref
        super().__init__(f"{ref} is yanked", f"undo it first with `lorabay hub yank {ref} --undo`")


class StoreFailed(RegistryUnavailable):
    """The store answered a request with an error it does not usually give (an S3 500, an
    unexpected code): ``operation`` on ``key`` failed with ``status``/``error_code``."""

    http_status = 502
    code = "registry_error"

    def __init__(
        self,
        url: str,
        operation: str,
        key: str,
        status: int | None,
        error_code: str,
        detail: str = "",
        hint: str | None = None,
    ):
        self.operation = operation
        self.key = key
        self.status = status
        self.error_code = error_code
        self.detail = detail
        answer = " ".join(dict.fromkeys(str(x) for x in (status, error_code) if x))
        reason = f"{operation} {key or '/'} answered {answer}" + (f": {detail}" if detail else "")
        super().__init__(url, reason)
        self.hint = hint or "retry; if it keeps failing, check the store's own logs and status"


class StoreThrottled(StoreFailed):
    """The store kept answering SlowDown / 503 after the client's retries."""

    http_status = 503
    code = "registry_throttled"


class StoreAccessDenied(StoreFailed):
    """The store refused a request: credentials, bucket policy, or a KMS key policy."""

    http_status = 503
    code = "registry_access_denied"


class HubFailed(LorabayError):
    """The Hugging Face Hub refused or failed a request (``status``: its HTTP status, if any)."""

    http_status = 502
    code = "hub_error"

    def __init__(self, location: str, reason: str, hint: str, status: int | None = None):
        self.location = location
        self.reason = reason
        self.status = status
        super().__init__(f"Hugging Face Hub, {location}: {reason}", hint)


class VersionAliased(LorabayError):
    """A version cannot be removed while aliases point at it (unless they are moved too)."""

    http_status = 409
    code = "conflict"

    def __init__(self, ref: str, aliases: list[str]):
        self.ref = ref
        self.aliases = list(aliases)
        shown = ", ".join(aliases)
        super().__init__(
            f"{ref} is what {shown} point{'s' if len(aliases) == 1 else ''} at",
            "move them first (`lorabay hub alias set NAME ALIAS VERSION`), or pass "
            "--drop-aliases or --move-aliases VERSION",
        )
