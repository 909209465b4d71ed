"""The web console: browse the registry, follow lineage, try adapters side by side.

``lorabay serve`` mounts it at ``/ui`` on the gateway (``add_gateway_console``);
``lorabay hub ui`` serves it for a registry alone (``standalone.py``). The pages are
plain HTML, CSS and JavaScript in ``static/`` (package data: no CDN, no build step);
``routes.py`` says what is served and how it is guarded, ``console.py`` what each JSON
endpoint answers for one key.
"""

from __future__ import annotations


def add_gateway_console(app, gateway) -> None:
    """Mount the console on the gateway's app: its keys, base, counters and /v1."""
    from lorabay.serve.ui.console import gateway_console
    from lorabay.serve.ui.routes import add_console

    add_console(app, gateway_console(gateway))
