"""`lorabay demo`: the whole loop on this machine, in a few minutes (what `make demo` runs).

Builds the tiny base, trains two QLoRA adapters with different behaviours, pushes
them to the embedded registry, starts `lorabay serve` on the NF4-quantized base,
asks the base and each adapter the same questions through the OpenAI client,
moves an alias and shows the answer change, then stops the server. Every step is a
real `lorabay` command, printed before it runs, so each can be repeated by hand.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

QUESTIONS = [
    "Review: nice cat warm tree",
    "Review: dark rain sad box",
    "Reverse: cat book",
    "Reverse: sun river",
]
# What each adapter must answer to its own task's questions (the toy tasks' rules).
EXPECTED = {
    "demo/sentiment": {QUESTIONS[0]: "positive", QUESTIONS[1]: "negative"},
    "demo/reverse": {QUESTIONS[2]: "book cat", QUESTIONS[3]: "river sun"},
}
TASKS = ("sentiment", "reverse")


def say(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def lorabay(*args: str, capture: bool = False) -> str:
    """Run one `lorabay` command as a user would, showing it first."""
    click.secho("$ lorabay " + shlex.join(args), fg="cyan")
    done = subprocess.run(
        [sys.executable, "-m", "lorabay.cli.main", *args],
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if done.returncode != 0:
        raise click.ClickException(f"`lorabay {args[0]} {args[1] if len(args) > 1 else ''}` failed")
    return done.stdout or ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException(
                "`lorabay serve` exited before it was ready (its log is above)"
            )
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"`lorabay serve` was not ready after {timeout:.0f} s")


def ask(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=8,
        temperature=0,
    )
    return " ".join(reply.choices[0].message.content.split())


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    click.secho(line.format(*header), bold=True)
    for row in rows:
        click.echo(line.format(*row))


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=".demo",
    show_default=True,
    help="Where the base, the data and the training runs go (reused on a second run).",
)
def demo(workdir: str) -> None:
    """Train two adapters, push them, serve them on an NF4 base, move an alias.

    \b
    Example:
      make demo                      # sets up .venv, then runs this
      lorabay demo --workdir /tmp/lorabay-demo
    """
    from lorabay.hub.settings import default_registry_url
    from lorabay.train.toy import write_toy
    from openai import OpenAI

    started = time.monotonic()
    work = Path(workdir).absolute()
    base = work / "tiny"
    click.echo(f"registry: {default_registry_url()}")

    say("1. a base model, built here (nothing is downloaded)")
    if (base / "model.safetensors").exists():
        click.echo(f"{base} exists; reusing it")
    else:
        lorabay("base", "create", str(base), "--size", "tiny")

    say("2. two adapters with different behaviours, trained as QLoRA on the NF4 base, pushed")
    for task in TASKS:
        files = write_toy(task, work / "data")
        lorabay(
            "train",
            "sft",
            "--config",
            str(files["sft-recipe"]),
            "--base",
            str(base),
            "--quantize",
            "nf4",
            "--output",
            str(work / "runs" / task),
            "--overwrite",
            "--push",
            f"demo/{task}",
        )
    # One name, two versions: `prod` starts on the sentiment adapter.
    lorabay(
        "hub",
        "push",
        str(work / "runs" / "sentiment" / "adapter"),
        "demo/assistant",
        "--alias",
        "prod",
    )
    lorabay("hub", "push", str(work / "runs" / "reverse" / "adapter"), "demo/assistant")
    lorabay("hub", "list")

    say("3. one NF4 base in vLLM behind the OpenAI-compatible gateway")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        "serve",
        "--base",
        str(base),
        "--served-name",
        "tiny",
        "--quantization",
        "nf4",
        "--port",
        str(port),
        "--max-loras",
        "4",
    ]
    click.secho("$ lorabay " + shlex.join(args) + " &", fg="cyan")
    server = subprocess.Popen(
        [sys.executable, "-m", "lorabay.cli.main", *args], start_new_session=True
    )
    try:
        wait_ready(url, server)
        client = OpenAI(base_url=f"{url}/v1", api_key="not-needed-on-loopback")

        say("4. the same questions to the base and to each adapter")
        models = ["tiny", "demo/sentiment", "demo/reverse"]
        rows = [[q, *(ask(client, m, q) for m in models)] for q in QUESTIONS]
        print_table(["question", *models], rows)
        answers = {
            (m, row[0]): answer for row in rows for m, answer in zip(models, row[1:], strict=True)
        }
        for model, expected in EXPECTED.items():
            for question, answer in expected.items():
                if answers[model, question] != answer:
                    raise click.ClickException(
                        f"{model} answered {answers[model, question]!r} to {question!r}, "
                        f"not {answer!r}: it did not learn its task"
                    )

        say("5. move an alias: demo/assistant:prod from version 1 (sentiment) to 2 (reverse)")
        question = QUESTIONS[2]
        before = ask(client, "demo/assistant:prod", question)
        lorabay("hub", "alias", "set", "demo/assistant", "prod", "2")
        moved = time.monotonic()
        # The gateway re-reads an alias at most every 0.5 s: new requests see the move
        # within a second, with no restart.
        after = ask(client, "demo/assistant:prod", question)
        while after == before and time.monotonic() - moved < 2:
            time.sleep(0.1)
            after = ask(client, "demo/assistant:prod", question)
        print_table(["question", "prod -> 1", "prod -> 2"], [[question, before, after]])
        if before == after:
            raise click.ClickException("the answer did not change within 2 s of the alias move")
        click.echo(f"new requests got version 2 within {time.monotonic() - moved:.1f} s")
    finally:
        say("6. stop the server")
        stop(server)
    click.secho(f"\ndone in {time.monotonic() - started:.0f} s; everything stopped.", fg="green")
