"""Test-time compute through the gateway: greedy, majority vote, best-of-N by an outcome
reward model and by a PRM, PRM-weighted vote and PRM-guided beam search at N = 1, 4, 16, 64,
and the time the verifier adds over sampling (issue 16).

    .venv/bin/python bench/ttc_bench.py                                  # tiny base, praise
    .venv/bin/python bench/ttc_bench.py --base smollm2-135m-instruct     # real base, arithmetic
    .venv/bin/python bench/ttc_bench.py --base smollm2-135m-instruct --train-prompts 128 \
        --heldout 16 --verifier-samples 4 --verifier-steps 60              # shorter (~45 min)
    .venv/bin/python bench/ttc_bench.py --heldout 8 --ns 1,4 --verifier-samples 2   # a smoke run

Everything runs through the commands and the API a user has, against one `lorabay serve`
started here: `lorabay train sft` makes the policy; its own samples on the training
prompts, each step labelled by the task's rule (Math-Shepherd's automatic labels), train
a PRM (`lorabay train prm`) and an outcome RM (`lorabay train reward` on right-over-wrong
pairs), pushed while the gateway runs. Then every held-out prompt gets one request per
method and N, the same seed for all best-of methods at one N (so they choose among the
same candidates):

- greedy: temperature 0;
- majority: ``best_of: N, weighted_vote, answer_pattern`` without a verifier;
- ORM / PRM: ``best_of: N, verifier``; PRM vote: the PRM-weighted vote;
- beam: ``search: {width: W, expand: M}`` with W x M = N continuations per step, so it
  samples about as many tokens as best-of-N (each continuation is one step of a
  solution, N solutions are N x steps of them; the table shows the tokens).

Tasks (``--task``, default by the base's vocabulary):

- ``praise`` (the tiny base, train/ttc_toy.py): "Praise: cat tree\\nSteps:", three lines,
  right when every line is a kind word; the policy's greedy answer is always wrong;
- ``arithmetic`` (a real base): "Compute 23 + 45 - 12.", one step a line
  ("23 + 45 = 68", "68 - 12 = 56") then "Answer: 56", right when the answer is.

Prints a markdown table (bench/README.md keeps the latest), writes --plot (default
bench/ttc_bench-TASK.png) and results.json into --work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchbase import lorabay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("majority", "orm", "prm", "prm_vote", "beam")
LABELS = {
    "greedy": "greedy",
    "majority": "majority vote",
    "orm": "best-of-N, outcome RM",
    "prm": "best-of-N, PRM",
    "prm_vote": "PRM-weighted vote",
    "beam": "beam search, PRM (W x M = N)",
}
BEAMS = {1: (1, 1), 4: (2, 2), 16: (4, 4), 64: (8, 8)}  # N -> (width, expand)


# -- tasks -------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    train: list  # prompts (text, or message lists)
    heldout: list
    sft: list[dict]  # the policy's SFT records
    policy_recipe: list[str]
    verifier_recipe: list[str]
    temperature: float
    max_tokens: int
    answer_pattern: str
    max_steps: int  # beam search
    extra_prm: list[dict] = field(default_factory=list)

    def steps(self, text: str) -> list[str]:
        raise NotImplementedError

    def labels(self, prompt, steps: list[str]) -> list[bool]:
        raise NotImplementedError

    def right(self, prompt, text: str) -> bool:
        raise NotImplementedError


class Praise(Task):
    def steps(self, text):
        from lorabay.train import ttc_toy

        return ttc_toy.solution_steps(text)

    def labels(self, prompt, steps):
        from lorabay.train import ttc_toy

        return ttc_toy.step_labels(steps)

    def right(self, prompt, text):
        from lorabay.train import ttc_toy

        return ttc_toy.is_right(text)


def praise_task(args) -> Task:
    from lorabay.train import ttc_toy
    from lorabay.train.toy import step_records

    train, heldout = ttc_toy.task_prompts(args.train_prompts, args.heldout)
    return Praise(
        name="praise",
        train=train,
        heldout=heldout,
        sft=ttc_toy.sft_records(train),
        policy_recipe=list(ttc_toy.POLICY_RECIPE),
        verifier_recipe=["--targets", "all-linear", "--lr", "2e-3", "--max-steps", "120"],
        temperature=ttc_toy.TEMPERATURE,
        max_tokens=12,
        answer_pattern=ttc_toy.ANSWER_PATTERN,
        max_steps=5,
        extra_prm=step_records(256, 0)[0],  # every word one of train/toy.py's 20
    )


PROBLEM = re.compile(r"Compute (\d+) \+ (\d+) - (\d+)\.")
ANSWER = r"Answer:\s*(-?\d+)"


def arithmetic_prompt(a: int, b: int, c: int) -> list[dict]:
    text = f"Compute {a} + {b} - {c}. Write one step per line, then 'Answer: N'."
    return [{"role": "user", "content": text}]


class Arithmetic(Task):
    def numbers(self, prompt) -> tuple[int, int, int]:
        return tuple(int(x) for x in PROBLEM.search(prompt[-1]["content"]).groups())

    def solution(self, a, b, c) -> list[str]:
        return [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}", f"Answer: {a + b - c}"]

    def steps(self, text):
        return [line for line in text.split("\n") if line.strip()]

    def labels(self, prompt, steps):
        expected = self.solution(*self.numbers(prompt))
        labels, right = [], True
        for index, step in enumerate(steps):
            right = right and index < len(expected) and step.strip() == expected[index]
            labels.append(right)
        return labels

    def right(self, prompt, text):
        found = re.search(ANSWER, text)
        a, b, c = self.numbers(prompt)
        return found is not None and int(found.group(1)) == a + b - c


def arithmetic_task(args) -> Task:
    rng = random.Random("ttc-arithmetic")
    seen, problems = set(), []
    while len(problems) < args.train_prompts + args.heldout:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        if (a, b, c) not in seen:
            seen.add((a, b, c))
            problems.append((a, b, c))
    task = Arithmetic(
        name="arithmetic",
        train=[arithmetic_prompt(*p) for p in problems[: args.train_prompts]],
        heldout=[arithmetic_prompt(*p) for p in problems[args.train_prompts :]],
        sft=[],
        policy_recipe=["--targets", "all-linear", "--r", "16", "--alpha", "32"]
        + ["--lr", "2e-4", "--batch-size", "8", "--max-steps", "60"],
        verifier_recipe=["--targets", "all-linear", "--r", "16", "--alpha", "32"]
        + ["--lr", "2e-4", "--batch-size", "8", "--max-steps", "150"],
        temperature=0.8,
        max_tokens=48,
        answer_pattern=ANSWER,
        max_steps=5,
    )
    task.sft = [
        {
            "messages": [
                *prompt,
                {"role": "assistant", "content": "\n".join(task.solution(*task.numbers(prompt)))},
            ]
        }
        for prompt in task.train
    ]
    return task


def with_steps(recipe: list[str], steps: int | None) -> list[str]:
    """``recipe`` with its ``--max-steps`` set to ``steps`` (None: as it is)."""
    if steps is None:
        return recipe
    at = recipe.index("--max-steps")
    return [*recipe[:at], "--max-steps", str(steps), *recipe[at + 2 :]]


# -- the commands and the API ------------------------------------------------------------


def train(method: str, name: str, data: Path, recipe: list[str], work: Path, args) -> dict:
    return lorabay(
        "train", method, "--base", args.base, "--data", str(data), "--push", name,
        "--output", str(work / "runs" / name.replace("/", "-")), "--overwrite",
        "--registry", args.registry, "--dropout", "0", "--logging-steps", "10", *recipe,
    )  # fmt: skip


def request_body(task: Task, prompt, **fields) -> tuple[str, dict]:
    """(endpoint, body) of one request for ``prompt`` with ``fields``."""
    body = {"model": "bench/policy", "max_tokens": task.max_tokens, **fields}
    body.setdefault("temperature", task.temperature)
    if isinstance(prompt, list):
        return "chat/completions", {**body, "messages": prompt}
    return "completions", {**body, "prompt": prompt}


def answer_text(endpoint: str, choice: dict) -> str:
    if endpoint == "chat/completions":
        return choice["message"]["content"] or ""
    return choice["text"]


async def post_all(url: str, requests: list[tuple[str, dict]], concurrency: int) -> list[dict]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

        async def one(endpoint, body):
            async with gate:
                response = await client.post(f"/v1/{endpoint}", json=body)
            if response.status_code != 200:
                raise SystemExit(f"{endpoint}: {response.status_code} {response.text[:300]}")
            return response.json()

        return await asyncio.gather(*(one(e, b) for e, b in requests))


def sample(url: str, task: Task, prompts: list, n: int, args) -> list[list[str]]:
    requests = [request_body(task, p, n=n, seed=i) for i, p in enumerate(prompts)]
    answers = asyncio.run(post_all(url, requests, args.concurrency))
    return [
        [answer_text(e, c) for c in sorted(a["choices"], key=lambda c: c["index"])]
        for (e, _), a in zip(requests, answers, strict=True)
    ]


def reply(prompt, text: str):
    """A response in the prompt's shape: an assistant message for a conversation."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def make_verifiers(url: str, task: Task, work: Path, args) -> dict:
    """Sample the policy on the training prompts, label every step by the rule, train the
    PRM and the outcome RM; their data sizes and training metrics."""
    from lorabay.train.data import write_jsonl

    started = time.monotonic()
    sampled = sample(url, task, task.train, args.verifier_samples, args)
    sampling_s = time.monotonic() - started
    records, pairs = list(task.extra_prm), []
    right = 0
    for prompt, texts in zip(task.train, sampled, strict=True):
        good = [t for t in texts if task.right(prompt, t)]
        bad = [t for t in texts if not task.right(prompt, t) and t.strip()]
        right += len(good)
        for text in texts:
            steps = task.steps(text)
            if steps and all(s.strip() for s in steps):
                records.append(
                    {"prompt": prompt, "completions": steps, "labels": task.labels(prompt, steps)}
                )
        pairs += [
            {
                "prompt": prompt,
                "chosen": reply(prompt, g),
                "rejected": reply(prompt, bad[i % len(bad)]),
            }
            for i, g in enumerate(good)
            if bad
        ]
    if len(pairs) < 8:
        raise SystemExit(
            f"only {len(pairs)} right-over-wrong pairs: sample more (--verifier-samples)"
        )
    prm = train(
        "prm",
        "bench/prm",
        write_jsonl(records, work / "prm.jsonl"),
        task.verifier_recipe,
        work,
        args,
    )
    orm = train(
        "reward",
        "bench/orm",
        write_jsonl(pairs, work / "pairs.jsonl"),
        task.verifier_recipe,
        work,
        args,
    )
    return {
        "samples": sum(map(len, sampled)),
        "right_share": round(right / max(1, sum(map(len, sampled))), 3),
        "sampling_s": round(sampling_s, 1),
        "prm_records": len(records),
        "orm_pairs": len(pairs),
        "prm_metrics": prm["metrics"],
        "orm_metrics": orm["metrics"],
    }


def method_fields(method: str, n: int, task: Task, args) -> dict:
    vote = {"weighted_vote": True, "answer_pattern": task.answer_pattern}
    if method == "majority":
        return {"best_of": n, **vote}
    if method == "orm":
        return {"best_of": n, "verifier": "bench/orm"}
    if method == "prm":
        return {"best_of": n, "verifier": "bench/prm", "aggregate": args.aggregate}
    if method == "prm_vote":
        return {"best_of": n, "verifier": "bench/prm", "aggregate": args.aggregate, **vote}
    width, expand = BEAMS[n]
    search = {"strategy": "beam", "width": width, "expand": expand, "max_steps": task.max_steps}
    # A beam's budget: a solution's tokens (continuations stop at each step's end).
    return {"search": search, "verifier": "bench/prm", "aggregate": args.aggregate}


def evaluate(url: str, task: Task, fields: dict, args) -> dict:
    """One request per held-out prompt: accuracy, tokens sampled, seconds sampling/scoring."""
    requests = [request_body(task, p, seed=1000 + i, **fields) for i, p in enumerate(task.heldout)]
    started = time.monotonic()
    answers = asyncio.run(post_all(url, requests, args.concurrency))
    wall = time.monotonic() - started
    right = [
        task.right(prompt, answer_text(endpoint, answer["choices"][0]))
        for prompt, (endpoint, _), answer in zip(task.heldout, requests, answers, strict=True)
    ]
    selection = [a.get("selection") or {} for a in answers]
    return {
        "accuracy": round(sum(right) / len(right), 3),
        "tokens": round(sum(a["usage"]["completion_tokens"] for a in answers) / len(answers), 1),
        "sampling_s": round(sum(s.get("sampling_seconds", 0.0) for s in selection), 2),
        "scoring_s": round(sum(s.get("scoring_seconds", 0.0) for s in selection), 2),
        "wall_s": round(wall, 1),
    }


# -- the report ----------------------------------------------------------------------------


def markdown(task: Task, results: dict, ns: list[int], args, loads, verifiers) -> str:
    lines = [
        f"Task {task.name} on {Path(args.base).name}: {len(task.heldout)} held-out prompts, "
        f"temperature {task.temperature}, PRM aggregate {args.aggregate}; verifiers trained on "
        f"{verifiers['samples']} policy samples of {len(task.train)} other prompts "
        f"({verifiers['right_share']:.0%} of them right); load average "
        f"{loads[0]:.1f} -> {loads[1]:.1f}; `lorabay serve {args.serve_flags}`.",
        "",
        "| method | " + " | ".join(f"N={n}" for n in ns) + " | tokens/prompt at N="
        f"{ns[-1]} | scoring / sampling time at N={ns[-1]} |",
        "|---|" + "---|" * (len(ns) + 2),
    ]
    greedy = results["greedy"]
    lines.append(
        f"| {LABELS['greedy']} | "
        + " | ".join(f"{greedy['accuracy']:.0%}" if n == ns[0] else "-" for n in ns)
        + f" | {greedy['tokens']} | - |"
    )
    for method in METHODS:
        row = results[method]
        last = row[str(ns[-1])]
        cells = [f"{row[str(n)]['accuracy']:.0%}" for n in ns]
        overhead = "-"
        if last["scoring_s"] and last["sampling_s"]:
            overhead = f"{last['scoring_s'] / last['sampling_s']:.0%}"
        lines.append(
            f"| {LABELS[method]} | " + " | ".join(cells) + f" | {last['tokens']} | {overhead} |"
        )
    return "\n".join(lines)


def plot(task: Task, results: dict, ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for method in METHODS:
        axes.plot(
            ns, [results[method][str(n)]["accuracy"] for n in ns], marker="o", label=LABELS[method]
        )
    axes.axhline(results["greedy"]["accuracy"], color="grey", linestyle="--", label="greedy")
    axes.set_xscale("log", base=2)
    axes.set_xticks(ns, [str(n) for n in ns])
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("N (candidates; beam: continuations per step)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(f"Test-time compute through the gateway ({task.name})")
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base",
        default=None,
        help="Base folder or a pulled base's name (default: a tiny base built here).",
    )
    parser.add_argument("--task", choices=("auto", "praise", "arithmetic"), default="auto")
    parser.add_argument("--work", default=None, help="Work folder (default: a temporary one).")
    parser.add_argument("--ns", default="1,4,16,64", help="Candidate counts, comma-separated.")
    parser.add_argument("--train-prompts", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument(
        "--verifier-samples", type=int, default=8, help="Policy samples per training prompt."
    )
    parser.add_argument("--aggregate", choices=("min", "prod", "last"), default="min")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--policy-steps", type=int, default=None, help="SFT steps of the policy (task's default)"
    )
    parser.add_argument(
        "--verifier-steps", type=int, default=None, help="steps of the PRM and the ORM each"
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG (default: bench/ttc_bench-TASK.png)"
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="an extra `lorabay serve` flag (repeatable), e.g. --serve-arg=--engine-arg=--seed=1",
    )
    args = parser.parse_args()

    from lorabay.hub.bases import resolve_base
    from lorabay.train.data import write_jsonl
    from lorabay.train.label.gateway import started_gateway

    work = Path(args.work or tempfile.mkdtemp(prefix="ttc-bench-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    if args.base is not None:  # a pulled base's name is found in the user's own home
        args.base = str(resolve_base(args.base))
    os.environ.setdefault("LORABAY_HOME", str(work / "home"))
    if args.base is None:
        from lorabay.train.base import create_base

        args.base = str(create_base(work / "tiny", size="tiny", seed=0, overwrite=True))
    args.base = str(resolve_base(args.base))
    vocab = json.loads((Path(args.base) / "config.json").read_text()).get("vocab_size", 0)
    name = args.task if args.task != "auto" else ("praise" if vocab <= 4096 else "arithmetic")
    task = praise_task(args) if name == "praise" else arithmetic_task(args)
    task.policy_recipe = with_steps(task.policy_recipe, args.policy_steps)
    task.verifier_recipe = with_steps(task.verifier_recipe, args.verifier_steps)
    args.plot = args.plot or ROOT / "bench" / f"ttc_bench-{task.name}.png"
    ns = [int(n) for n in args.ns.split(",")]
    unknown = [n for n in ns if n not in BEAMS]
    if unknown:
        raise SystemExit(f"--ns: {unknown} (each of 1, 4, 16, 64: beam search needs W x M = N)")
    args.registry = f"file://{work / 'registry'}"
    loads = [os.getloadavg()[0]]
    begun = time.monotonic()

    policy = train(
        "sft",
        "bench/policy",
        write_jsonl(task.sft, work / "sft.jsonl"),
        task.policy_recipe,
        work,
        args,
    )
    largest = max(ns)
    serve_args = f"--max-best-of {largest} --max-search-samples {largest} --max-search-steps 8"
    serve_args += f" --max-n {largest}"
    serve_args += "".join(f" {shlex.quote(arg)}" for arg in args.serve_arg)
    args.serve_flags = serve_args
    results: dict = {}
    with started_gateway(args.base, args.registry, serve_args=serve_args, notify=print) as gateway:
        url = gateway.url
        verifiers = make_verifiers(url, task, work, args)
        results["greedy"] = evaluate(url, task, {"temperature": 0.0}, args)
        print(f"greedy: {results['greedy']}", file=sys.stderr, flush=True)
        for method in METHODS:
            results[method] = {}
            for n in ns:
                results[method][str(n)] = evaluate(
                    url, task, method_fields(method, n, task, args), args
                )
                print(f"{method} N={n}: {results[method][str(n)]}", file=sys.stderr, flush=True)
    loads.append(os.getloadavg()[0])
    table = markdown(task, results, ns, args, loads, verifiers)
    plot(task, results, ns, args.plot)
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "task": task.name,
        "policy_metrics": policy["metrics"],
        "verifiers": verifiers,
        "results": results,
        "total_s": round(time.monotonic() - begun),
        "table": table,
    }
    (work / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"\nresults: {work / 'results.json'}; plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the gateway is stopped by then (started_gateway)
        raise SystemExit(130) from None
