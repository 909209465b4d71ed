"""lorabay.hub: the adapter registry.

    from lorabay.hub import Registry
    reg = Registry.open()                      # $LORABAY_REGISTRY or file://$LORABAY_HOME/registry
    m = reg.push("./adapter", "team/summarize", aliases=["prod"]).manifest
    folder = reg.pull("team/summarize:prod")   # verified, cached by digest

See ``registry.py`` for the whole API and ``store.py`` for the storage layout.
"""

from lorabay.hub.errors import (
    AdapterNotFound,
    Conflict,
    DigestMismatch,
    IncompatibleBase,
    InvalidAdapter,
    InvalidReference,
    LorabayError,
    RegistryUnavailable,
)
from lorabay.hub.manifest import Manifest
from lorabay.hub.reference import Reference, parse_reference
from lorabay.hub.registry import (
    Change,
    GcReport,
    Problem,
    Pushed,
    Registry,
    Removed,
    YankedWarning,
)

__all__ = [
    "AdapterNotFound",
    "Change",
    "Conflict",
    "DigestMismatch",
    "GcReport",
    "IncompatibleBase",
    "InvalidAdapter",
    "InvalidReference",
    "LorabayError",
    "Manifest",
    "Problem",
    "Pushed",
    "Reference",
    "Registry",
    "RegistryUnavailable",
    "Removed",
    "YankedWarning",
    "parse_reference",
]
