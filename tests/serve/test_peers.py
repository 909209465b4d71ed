"""Adapter affinity across gateways (`lorabay serve --peers`, serve/peers.py).

The unit tests check the hashing and the membership; the last test runs two real
`lorabay serve` processes (two vLLM engines, tiny base) that name each other as peers.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from lorabay.hub.errors import ConfigError
from lorabay.serve.peers import DOWN_SECONDS, Peers, home_of, parse_peers

NAMES = [f"team/a{i:03d}" for i in range(600)]


def test_each_name_has_one_home_and_losing_a_member_moves_only_its_names():
    members = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    homes = {name: home_of(name, members) for name in NAMES}
    counts = [list(homes.values()).count(m) for m in members]
    assert all(count > len(NAMES) / 5 for count in counts), counts  # spread, not piled up
    assert homes == {name: home_of(name, list(reversed(members))) for name in NAMES}
    rest = members[:2]
    for name, home in homes.items():
        if home in rest:
            assert home_of(name, rest) == home  # names of the remaining members stay put
    assert home_of("x", []) is None


def test_peers_are_a_url_list_or_a_dns_name():
    assert parse_peers("http://a:1, http://b:2/") == (["http://a:1", "http://b:2"], None)
    assert parse_peers("dns:lorabay-peers.ns.svc:8000") == ([], ("lorabay-peers.ns.svc", 8000))
    for bad in ("", "dns:name", "a:1", "http://a", "ftp://a:1"):
        with pytest.raises(ConfigError):
            parse_peers(bad)


def test_a_gateway_finds_itself_and_skips_a_peer_that_is_down():
    me, other = "http://127.0.0.1:4001", "http://127.0.0.1:4002"

    async def main():
        peers = Peers(f"{me},{other}", port=4001)
        homes = {name: await peers.home(name) for name in NAMES}
        assert peers.me == me
        assert {h for h in homes.values()} == {None, other}  # None: served here
        peers.mark_down(other, "unreachable")
        assert {await peers.home(name) for name in NAMES} == {None}

        dns = Peers("dns:localhost:4001", port=4001)  # 127.0.0.1 and ::1: both this one
        assert [await dns.home(name) for name in NAMES[:20]] == [None] * 20
        assert len(dns.members) == 1

    asyncio.run(main())


# -- two real gateways -------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def peer_secret(folder) -> Path:
    path = folder / "peer-secret"
    path.write_text(secrets.token_hex(32))
    return path


def logged(gateway, text: str, seconds: float = 5.0) -> bool:
    """Whether ``text`` shows in the gateway's log within ``seconds`` (it is read on a thread)."""
    deadline = time.monotonic() + seconds
    while text not in gateway.output and time.monotonic() < deadline:
        time.sleep(0.05)
    return text in gateway.output


@pytest.mark.vllm
def test_two_gateways_send_each_adapter_to_its_home(tiny_base, make_lora, tmp_path):
    from servetools import GatewayProcess, tiny_serve_args

    from lorabay.hub import Registry
    from lorabay.serve.peers import FORWARDED

    registry_url = f"file://{tmp_path / 'registry'}"
    registry = Registry.open(registry_url)
    ports = free_ports(2)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    names = [f"team/p{i}" for i in range(24)]  # each gateway is home to at least 2 (random ports)
    for i, name in enumerate(names):
        registry.push(make_lora(seed=40 + i), name, base=tiny_base)
    far, forged_far, *_ = [n for n in names if home_of(n, urls) == urls[1]]  # B's, asked of A
    near = next(n for n in names if home_of(n, urls) == urls[0])  # A's own
    secret = peer_secret(tmp_path)
    gateways = [
        GatewayProcess(
            [*tiny_serve_args(tiny_base, registry_url, port), "--peers", ",".join(urls)]
            + ["--peer-secret-file", str(secret)],
            env={"LORABAY_HOME": str(tmp_path / f"home-{port}")},
        )
        for port in ports
    ]
    try:
        for gateway in gateways:  # both engines start at once
            gateway.launch()
        for gateway in gateways:
            gateway.wait_listening()
            assert gateway.url, gateway.output
        a, b = gateways

        def ask(model: str, stream: bool = False, headers=None) -> httpx.Response:
            body = {"model": model, "prompt": "hi", "max_tokens": 2, "stream": stream}
            url = f"{a.url}/v1/completions"
            return httpx.post(url, json=body, headers=headers, timeout=300)

        answer = ask(far)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == f"{far}@{registry.resolve(far).digest}"
        streamed = ask(far, stream=True)
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("[DONE]")
        assert ask(near).status_code == 200
        assert ask("tiny").status_code == 200  # the base: served where it arrives
        assert logged(b, f"adapter loaded: {far}@") and f"adapter loaded: {far}@" not in a.output
        assert logged(a, f"adapter loaded: {near}@")
        # A client's own "x-lorabay-forwarded" proves nothing: the affinity holds.
        assert ask(forged_far, headers={FORWARDED: "1"}).status_code == 200
        assert logged(b, f"adapter loaded: {forged_far}@")
        assert f"adapter loaded: {forged_far}@" not in a.output
        metrics = a.metrics()
        assert f'lorabay_requests_forwarded_total{{peer="{urls[1]}"}} 3.0' in metrics
        problem = ask("team/missing-name")  # the home answers with the registry's own error
        assert problem.status_code == 404 and "team/missing-name" in json.dumps(problem.json())

        b.engine_process().kill()  # B's engine dies: B answers 503 while it restarts it
        answer = ask(far)
        assert answer.status_code == 200, answer.text  # answered by A instead
        assert logged(a, f"adapter loaded: {far}@")
        assert logged(a, f"peer {urls[1]}: its engine is not available (503)")

        time.sleep(DOWN_SECONDS)  # B is asked again after this
        b.stop(signal.SIGTERM)  # B goes away: A serves B's adapters itself
        other = next(n for n in names if home_of(n, urls) == urls[1] and n not in (far, forged_far))
        answer = ask(other)
        assert answer.status_code == 200, answer.text
        assert logged(a, f"adapter loaded: {other}@")
        assert logged(a, f"peer {urls[1]}: unreachable (ClientConnectorError)")
    finally:
        for gateway in gateways:
            gateway.stop(signal.SIGTERM)
            gateway.kill_leftovers()


@pytest.mark.vllm
def test_a_busy_home_sends_requests_back_and_a_hot_adapter_spreads(tiny_base, make_lora, tmp_path):
    """--spill-at: a home with that many requests in flight turns forwarded ones away (429,
    x-lorabay-busy) and the gateway that forwarded them answers them itself. The home here is
    a stand-in that is always busy (a second engine would only make it slower to start)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from servetools import GatewayProcess, tiny_serve_args

    from lorabay.hub import Registry
    from lorabay.serve.peers import BUSY, FORWARDED, sign_forward

    class AlwaysBusy(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(429)
            self.send_header(BUSY, "1")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    registry_url = f"file://{tmp_path / 'registry'}"
    registry = Registry.open(registry_url)
    port, busy_port = free_ports(2)
    urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{busy_port}"]
    hot = next(n for n in NAMES if home_of(n, urls) == urls[1])  # the busy one's
    registry.push(make_lora(seed=7), hot, base=tiny_base)
    busy = ThreadingHTTPServer(("127.0.0.1", busy_port), AlwaysBusy)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    secret = peer_secret(tmp_path)
    gateway = GatewayProcess(
        [*tiny_serve_args(tiny_base, registry_url, port), "--peers", ",".join(urls)]
        + ["--spill-at", "0", "--peer-secret-file", str(secret)],
        env={"LORABAY_HOME": str(tmp_path / "home")},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        body = {"model": hot, "prompt": "hi", "max_tokens": 2}
        for _ in range(2):
            answer = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=300)
            assert answer.status_code == 200, answer.text  # answered here, not queued there
        assert logged(gateway, f"adapter loaded: {hot}@")
        assert "not available" not in gateway.output  # busy is not down: no peer skipped
        metrics = gateway.metrics()
        assert f'lorabay_requests_spilled_total{{peer="{urls[1]}"}} 2.0' in metrics

        # As a home it is busy too (--spill-at 0): a forwarded request goes back at once...
        raw = json.dumps(body).encode()
        signed = sign_forward(secret.read_text().strip().encode(), "/v1/completions", raw)
        headers = {FORWARDED: signed, "content-type": "application/json"}
        url = f"{gateway.url}/v1/completions"
        sent_back = httpx.post(url, content=raw, headers=headers, timeout=60)
        assert sent_back.status_code == 429 and sent_back.headers.get(BUSY) == "1"
        assert sent_back.json()["error"]["code"] == "busy"
        # ...but one a client marks itself is a client's request like any other.
        forged = httpx.post(url, content=raw, headers={**headers, FORWARDED: "1"}, timeout=300)
        assert forged.status_code == 200, forged.text
    finally:
        busy.shutdown()
        busy.server_close()
        gateway.stop(signal.SIGTERM)
        gateway.kill_leftovers()


def test_spill_at_needs_peers(tiny_base):
    from lorabay.serve.options import ServeOptions, check_options

    with pytest.raises(ConfigError, match="--spill-at"):
        check_options(ServeOptions(base=str(tiny_base), spill_at=4))


def test_a_forwarded_mark_is_an_hmac_of_the_request():
    from lorabay.serve.peers import sign_forward, verify_forward

    secret, body, path = b"s" * 32, b'{"model": "team/a"}', "/v1/completions"
    mark = sign_forward(secret, path, body)
    assert verify_forward(secret, mark, path, body)
    assert not verify_forward(b"t" * 32, mark, path, body)  # another secret
    assert not verify_forward(secret, mark, path, body + b" ")  # another body
    assert not verify_forward(secret, mark, "/v1/chat/completions", body)
    assert not verify_forward(secret, sign_forward(secret, path, body, now=1000), path, body)
    for forged in ("1", "", "x.y", f"{int(time.time())}." + "0" * 64):
        assert not verify_forward(secret, forged, path, body)
