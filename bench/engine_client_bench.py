"""What relaying a streamed answer from the engine costs the gateway, per HTTP client.

    .venv/bin/python bench/engine_client_bench.py            # 1,024 answers, 32 at a time

The gateway reads each generation from its engine over a Unix socket; on a CPU machine
every microsecond it spends there is taken from the cores the engine computes on. This
runs a stand-in engine (an aiohttp server in another process, streaming ``--tokens``
SSE events of vLLM's shape per answer, ``--gap-ms`` apart) and reads ``--requests``
answers, ``--concurrency`` at a time, with the client the gateway uses for generation
(aiohttp, serve/gateway.py ``Gateway.send``) and with httpx, which it used before (same
pool limits, keep-alive and timeouts). Reports the reading process's CPU time per answer
and the wall time, each client in its own process, ``--rounds`` times alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EVENT = (
    b'data: {"id":"cmpl-0","object":"text_completion","created":1,"model":"m","choices":'
    b'[{"index":0,"text":" word","logprobs":null,"finish_reason":null,"stop_reason":null}]'
    b',"usage":null}\n\n'
)
CLIENTS = ("aiohttp", "httpx")


async def serve(socket_path: str, tokens: int, gap: float) -> None:
    from aiohttp import web

    async def completions(request):
        await request.read()
        answer = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await answer.prepare(request)
        for _ in range(tokens):
            await answer.write(EVENT)
            await asyncio.sleep(gap)
        await answer.write(b"data: [DONE]\n\n")
        await answer.write_eof()
        return answer

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, socket_path).start()
    await asyncio.Event().wait()


async def read_answers(client: str, socket_path: str, args) -> dict:
    """Read every answer with ``client``; CPU ms per answer and wall seconds."""
    body = json.dumps({"model": "m", "prompt": "x" * 256, "stream": True}).encode()
    headers = {"content-type": "application/json"}
    if client == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            base_url="http://engine",
            connector=aiohttp.UnixConnector(path=socket_path, limit=1024, keepalive_timeout=20),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )

        async def one():
            answer = await session.post("/v1/completions", data=body, headers=headers)
            async for _ in answer.content.iter_any():
                pass
            answer.release()

        close = session.close
    else:
        import httpx

        limits = httpx.Limits(
            max_connections=1024, max_keepalive_connections=256, keepalive_expiry=20
        )
        transport = httpx.AsyncHTTPTransport(uds=socket_path, limits=limits)
        http = httpx.AsyncClient(
            transport=transport, base_url="http://engine", timeout=httpx.Timeout(None, connect=10)
        )

        async def one():
            request = http.build_request("POST", "/v1/completions", content=body, headers=headers)
            answer = await http.send(request, stream=True)
            async for _ in answer.aiter_raw():
                pass
            await answer.aclose()

        close = http.aclose

    gate = asyncio.Semaphore(args.concurrency)

    async def bounded():
        async with gate:
            await one()

    await asyncio.gather(*(bounded() for _ in range(args.concurrency * 2)))  # connections
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(bounded() for _ in range(args.requests)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    await close()
    return {"cpu_ms_per_answer": 1000 * cpu / args.requests, "wall_s": wall}


def new_loop():
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_in_child(role: str, socket_path: str, args) -> subprocess.Popen:
    argv = [sys.executable, __file__, f"--role={role}", f"--socket={socket_path}"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in PASSED]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


PASSED = ("requests", "concurrency", "tokens", "gap_ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="SSE events per answer")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="between two events")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--role", choices=("run", "server", *CLIENTS), default="run")
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "server":
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(serve(args.socket, args.tokens, args.gap_ms / 1000))
        return
    if args.role in CLIENTS:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            print(json.dumps(runner.run(read_answers(args.role, args.socket, args))))
        return

    with tempfile.TemporaryDirectory() as folder:
        socket_path = os.path.join(folder, "engine.sock")
        server = run_in_child("server", socket_path, args)
        try:
            while not Path(socket_path).exists():
                time.sleep(0.05)
            results: dict[str, list[dict]] = {c: [] for c in CLIENTS}
            for round_ in range(args.rounds):
                for client in CLIENTS if round_ % 2 == 0 else CLIENTS[::-1]:
                    child = run_in_child(client, socket_path, args)
                    out, _ = child.communicate()
                    results[client].append(json.loads(out.strip().splitlines()[-1]))
        finally:
            server.terminate()
            server.wait()
    print(
        f"{args.requests} streamed answers of {args.tokens} events ({args.gap_ms} ms apart), "
        f"{args.concurrency} at a time, over a Unix socket; median of {args.rounds} rounds\n"
    )
    print("| client | CPU ms per answer | wall s |\n|---|---:|---:|")
    for client in CLIENTS:
        cpu = statistics.median(r["cpu_ms_per_answer"] for r in results[client])
        wall = statistics.median(r["wall_s"] for r in results[client])
        print(f"| {client} | {cpu:.2f} | {wall:.1f} |")
    ratio = statistics.median(
        h["cpu_ms_per_answer"] / a["cpu_ms_per_answer"]
        for a, h in zip(results["aiohttp"], results["httpx"], strict=True)
    )
    print(f"\nhttpx / aiohttp CPU per answer: {ratio:.1f}x (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
