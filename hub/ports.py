"""A free TCP port on the loopback interface, for a server this machine starts.

    port = free_port()   # e.g. accelerate's rendezvous, or `lorabay serve` in the demo

The port is free when asked; another process may take it before the server binds, so
callers that start the server themselves bind port 0 instead where they can.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
