"""Serving's errors: the engine, the gateway, API keys and request bodies.

They derive from :class:`lorabay.hub.errors.LorabayError` (the CLI prints each as one
line, the gateway maps each to an HTTP status and an OpenAI-style body). Their classes
still stand in ``hub/errors.py`` and move here in issue 19's part 2; import them from
this module.
"""

from lorabay.hub.errors import (
    AdapterLoadFailed,
    EngineStartFailed,
    EngineUnavailable,
    InvalidRequest,
    Unauthorized,
)

__all__ = [
    "AdapterLoadFailed",
    "EngineStartFailed",
    "EngineUnavailable",
    "InvalidRequest",
    "Unauthorized",
]
