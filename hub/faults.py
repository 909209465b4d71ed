"""Named crash points for the crash-safety tests.

``LORABAY_FAULT=push:blobs`` makes the process SIGKILL itself when it reaches
``checkpoint("push:blobs")``: a real kill at a precise moment, so the tests can
show that every such moment leaves the registry consistent. Unset, a checkpoint
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def checkpoint(name: str) -> None:
    if os.environ.get("LORABAY_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
