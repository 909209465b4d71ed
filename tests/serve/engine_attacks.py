"""What another local process tries against the engine (issue 14's list), stdlib only.

Run as a separate process, possibly as another user with the system Python:

    python3 engine_attacks.py SOCKET [TOKEN] [VICTIM_ENGINE_NAME]

It prints one JSON object: attack name -> the HTTP status the engine answered, or the
name of the error that stopped the connection (PermissionError: the socket's folder is
closed to this user). Whether the engine listens on TCP at all the test checks itself,
from the engine's own sockets.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys

VICTIM = "team-a/x@sha256:" + "0" * 64


def attacks(victim: str) -> dict[str, tuple[str, str, dict | None, dict]]:
    """name -> (method, path, JSON body, extra headers)."""
    return {
        "load via /adapters": ("POST", "/adapters", {"name": victim, "src": "/etc"}, {}),
        "unload via /adapters": ("DELETE", f"/adapters/{victim}", None, {}),
        "run any adapter via /invocations": (
            "POST",
            "/invocations",
            {"prompt": "hi", "max_tokens": 1},
            {"X-Amzn-SageMaker-Adapter-Identifier": victim},
        ),
        "generative_scoring": (
            "POST",
            "/generative_scoring",
            {"model": victim, "query": "q", "items": ["a"], "label_token_ids": [1]},
            {},
        ),
        "tokenize": ("POST", "/tokenize", {"model": "tiny", "prompt": "hi"}, {}),
        "metrics": ("GET", "/metrics", None, {}),
        "scale_elastic_ep": ("POST", "/scale_elastic_ep", {"new_data_parallel_size": 2}, {}),
        "ping": ("GET", "/ping", None, {}),
        "inference generate": ("POST", "/inference/v1/generate", {"prompt": "hi"}, {}),
        "load_lora_adapter": (
            "POST",
            "/v1/load_lora_adapter",
            {"lora_name": victim, "lora_path": "/etc"},
            {},
        ),
        "completions": ("POST", "/v1/completions", {"model": victim, "prompt": "hi"}, {}),
        "health": ("GET", "/health", None, {}),
    }


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("engine", timeout=30)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.path)
        self.sock = sock


def send(connection, method: str, path: str, body, headers: dict) -> str:
    try:
        payload = None if body is None else json.dumps(body).encode()
        sent = {"content-type": "application/json", **headers}
        connection.request(method, path, body=payload, headers=sent)
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except OSError as error:
        return type(error).__name__
    finally:
        connection.close()


def main() -> None:
    path = sys.argv[1]
    token = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    victim = sys.argv[3] if len(sys.argv) > 3 else VICTIM
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    results = {}
    for name, (method, route, body, headers) in attacks(victim).items():
        results[name] = send(UnixConnection(path), method, route, body, {**headers, **auth})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
