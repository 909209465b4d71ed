"""RLAIF on a real base: can a 135M instruct model label its own preferences under a written
principle, and does one DPO round on its labels move the policy? And with a judge adapter?

    lorabay base pull smollm2-135m-instruct
    .venv/bin/python bench/rlaif_bench.py --base ~/.lorabay/bases/smollm2-135m-instruct
    .venv/bin/python bench/rlaif_bench.py --base ./tiny --train-prompts 8 --heldout 4 \
        --judge-prompts 8 --dpo-steps 2 --judge-steps 2 --max-tokens 8   # a smoke run

The principle is `concise` from lorabay's example constitution (train/assets), because a
script can check it: a response complies when it has at most --max-words words, and of
two responses the script prefers the one with at least 25% fewer words (closer than that:
a tie, left out of the agreement). Everything runs through the commands a user runs,
against one `lorabay serve --base BASE` started here:

1. before: --samples responses of the base to each held-out prompt; their compliance;
2. self: `lorabay label --mode prefs` with the base as policy and as its own judge on the
   train prompts; agreement of the kept pairs with the script; the judge's position bias
   (how often it answers A), how often its two orders agree, and how much of its first
   token's probability went to A or B at all;
3. `lorabay train dpo` on those labels (a fresh LoRA; the reference: the base), then the
   DPO adapter's compliance on the held-out prompts; 2. and 3. run at --threshold and again
   keeping every pair (0.5), since a judge with a strong position bias keeps none;
4. adapter: a judge adapter SFT-trained on the script's verdicts over base responses to
   other prompts (--judge-samples each, every pair the script decides, both orders;
   train/label/teach.py), then 2. and 3. again with it.

Prints a markdown table (bench/README.md keeps the latest one) and writes results.json
into --work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchbase import lorabay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRINCIPLE = "concise"
MARGIN = 0.75  # the script prefers x when words(x) <= MARGIN * words(y)

TOPICS = (
    "a river", "a battery", "a volcano", "a library", "the moon", "a bicycle", "rain",
    "a passport", "a vaccine", "a rainbow", "an earthquake", "a compass", "a glacier",
    "a password", "a thermometer", "bread", "a camera", "a bridge", "a desert", "honey",
    "a calendar", "an election", "a microscope", "a forest", "a lighthouse", "coffee",
    "a spreadsheet", "a museum", "a telescope", "a hurricane", "a piano", "a map",
    "electricity", "a satellite", "a recipe", "a budget", "a tide", "a seed", "a magnet",
    "a fever", "a vote", "an email", "a cloud", "a dictionary", "a helmet", "a fossil",
    "a printer", "a rocket",
)  # fmt: skip
QUESTIONS = (
    "What is {t}?",
    "Why does {t} matter to people?",
    "Give me one fact about {t}.",
    "How would you explain {t} to a child?",
)


def words(text: str) -> int:
    return len(text.split())


def script_prefers(x: str, y: str) -> bool | None:
    """The rule: True when x is clearly shorter, False when y is, None for a tie."""
    wx, wy = words(x), words(y)
    if wx <= MARGIN * wy:
        return True
    if wy <= MARGIN * wx:
        return False
    return None


def prompt_splits(args) -> dict[str, list[str]]:
    prompts = [q.format(t=t) for t in TOPICS for q in QUESTIONS]  # 192
    random.Random(0).shuffle(prompts)
    sizes = {"heldout": args.heldout, "train": args.train_prompts, "judge": args.judge_prompts}
    if sum(sizes.values()) > len(prompts):
        raise SystemExit(f"at most {len(prompts)} prompts in all")
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = prompts[start : start + size]
        start += size
    return splits


def sample(url: str, model: str, prompts: list[str], args, n: int) -> list[list[str]]:
    """``n`` responses of ``model`` to each prompt (the policy's sampling settings)."""
    from lorabay.train.label.client import Endpoint

    async def run():
        async with Endpoint(url, concurrency=args.concurrency, timeout=900) as endpoint:
            answers = await asyncio.gather(
                *(
                    endpoint.chat(
                        model, [{"role": "user", "content": p}], n=n,
                        temperature=args.temperature, max_tokens=args.max_tokens,
                    )  # no seed: vLLM 0.32's CPU engine dies on seeded chunked prefills
                    for p in prompts
                )
            )  # fmt: skip
        return [[c["message"]["content"] or "" for c in a["choices"]] for a in answers]

    return asyncio.run(run())


def compliance(answers: list[list[str]], max_words: int) -> dict:
    flat = [a for batch in answers for a in batch]
    return {
        "responses": len(flat),
        "complying": round(sum(words(a) <= max_words for a in flat) / len(flat), 3),
        "mean_words": round(sum(map(words, flat)) / len(flat), 1),
    }


def agreement(labels: Path) -> dict:
    """Kept pairs whose chosen response the script also prefers, among those it decides."""
    from lorabay.train.data import load_records

    decided = agree = 0
    for record in load_records(labels) if labels.stat().st_size else []:
        verdict = script_prefers(record["chosen"][0]["content"], record["rejected"][0]["content"])
        if verdict is not None:
            decided += 1
            agree += verdict
    return {
        "decided": decided,
        "agree": agree,
        "rate": round(agree / decided, 3) if decided else None,
    }


def label_run(url, name, judge, threshold, prompts_file: Path, work: Path, args):
    out = work / f"labels-{name}.jsonl"
    result = lorabay(
        "label", "--endpoint", url, "--policy", args.served_name, "--judge", judge,
        "--prompts", str(prompts_file), "--out", str(out), "--principles", PRINCIPLE,
        "--samples", str(args.samples), "--temperature", str(args.temperature),
        "--max-tokens", str(args.max_tokens), "--threshold", str(threshold),
        "--concurrency", str(args.concurrency), "--overwrite",
    )  # fmt: skip
    return out, result


def dpo_round(labels: Path, name: str, work: Path, args) -> dict | None:
    from lorabay.train.data import load_records

    if len(load_records(labels)) < 2:  # nothing to learn from: say so rather than fail
        return None
    return lorabay(
        "train", "dpo", "--base", args.base, "--data", str(labels),
        "--output", str(work / "runs" / f"dpo-{name}"), "--overwrite",
        "--registry", args.registry, "--push", f"bench/concise-{name}",
        "--targets", "all-linear", "--r", "16", "--alpha", "32", "--lr", str(args.dpo_lr),
        "--beta", "0.1", "--batch-size", "8", "--max-steps", str(args.dpo_steps),
        "--max-length", "512", "--logging-steps", "5",
    )  # fmt: skip


def train_judge(url: str, splits, work: Path, args) -> tuple[dict, dict]:
    """A judge adapter trained on the script's verdicts over base responses to the judge
    prompts (both orders; ties left out)."""
    from lorabay.train.data import write_jsonl
    from lorabay.train.label.constitution import load_constitution
    from lorabay.train.label.teach import judge_sft_records

    answers = sample(url, args.served_name, splits["judge"], args, args.judge_samples)
    examples = []
    for prompt, batch in zip(splits["judge"], answers, strict=True):
        for i in range(len(batch)):
            for j in range(i + 1, len(batch)):
                examples.append((prompt, batch[i], batch[j], script_prefers(batch[i], batch[j])))
    records = judge_sft_records(load_constitution(), PRINCIPLE, examples)
    data = write_jsonl(records, work / "judge-sft.jsonl")
    trained = lorabay(
        "train", "sft", "--base", args.base, "--data", str(data),
        "--output", str(work / "runs" / "judge"), "--overwrite",
        "--registry", args.registry, "--push", "bench/concise-judge",
        "--targets", "all-linear", "--r", "16", "--alpha", "32", "--lr", str(args.judge_lr),
        "--batch-size", "8", "--max-steps", str(args.judge_steps), "--max-length", "768",
        "--logging-steps", "5",
    )  # fmt: skip
    return trained, {"examples": len(examples), "records": len(records)}


def judge_row(name, url, judge, threshold, splits, prompts_file, work, args, before) -> dict:
    """Label the train prompts with ``judge``, one DPO round on the labels, the held-out
    compliance of the DPO adapter."""
    started = time.monotonic()
    labels, result = label_run(url, name, judge, threshold, prompts_file, work, args)
    label_s = time.monotonic() - started
    counts = result["counts"]
    row = {
        "judge": name,
        "threshold": threshold,
        "label_s": round(label_s),
        "pairs": counts.get("pairs", 0),
        "kept": counts.get("records", 0),
        "dropped": {k: v for k, v in counts.items() if k.startswith("dropped_")},
        "first_position_rate": counts.get("first_position_rate"),
        "order_agreement": counts.get("order_agreement"),
        "answer_mass": counts.get("answer_mass"),
        "agreement": agreement(labels),
        "before": before,
    }
    started = time.monotonic()
    dpo = dpo_round(labels, name, work, args)
    row["dpo_s"] = round(time.monotonic() - started)
    if dpo is None:
        row["after"] = None
        return row
    row["dpo_lineage_provenance"] = dpo["lineage"].get("dataset_provenance")
    after = sample(url, dpo["pushed"]["ref"], splits["heldout"], args, args.samples)
    row["after"] = compliance(after, args.max_words)
    return row


def markdown(rows: list[dict], args, loads) -> str:
    lines = [
        f"principle `{PRINCIPLE}` (a response complies with at most {args.max_words} words; "
        f"the script prefers >= {1 - MARGIN:.0%} fewer words), "
        f"{args.samples} samples per prompt at temperature {args.temperature}, "
        f"max {args.max_tokens} tokens; {args.train_prompts} train / {args.heldout} held-out "
        f"prompts; DPO {args.dpo_steps} steps; the judge adapter {args.judge_steps} steps on "
        f"{args.judge_prompts} prompts x {args.judge_samples} samples",
        "",
        "| judge | threshold | pairs | kept | dropped (low conf / identical / no verdict / empty) | "
        "kept pairs agreeing with the script | picks A | orders agree | p(A)+p(B) | "
        "held-out compliance before -> after DPO | mean words before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row["dropped"]
        dropped = (
            f"{d.get('dropped_low_confidence', 0)} / {d.get('dropped_identical', 0)} / "
            f"{d.get('dropped_no_verdict', 0)} / {d.get('dropped_empty', 0)}"
        )
        a = row["agreement"]
        agree = f"{a['agree']}/{a['decided']} ({a['rate']:.0%})" if a["decided"] else "n/a"
        before, after = row["before"], row["after"]
        moved = (
            f"{before['complying']:.0%} -> {after['complying']:.0%}"
            if after
            else f"{before['complying']:.0%} -> (no DPO: too few pairs)"
        )
        length = f"{before['mean_words']} -> {after['mean_words']}" if after else "-"
        lines.append(
            f"| {row['judge']} | {row['threshold']} | {row['pairs']} | {row['kept']} | "
            f"{dropped} | {agree} | "
            f"{fmt(row['first_position_rate'])} | {fmt(row['order_agreement'])} | "
            f"{fmt(row['answer_mass'])} | {moved} | {length} |"
        )
    lines += [
        "",
        f"{platform.node()} / {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average {loads[0]:.1f} at the start, "
        f"{loads[1]:.1f} at the end",
    ]
    return "\n".join(lines)


def fmt(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="Base folder (or a pulled base's name).")
    parser.add_argument("--work", default=None, help="Work folder (default: a temporary one).")
    parser.add_argument("--served-name", default="base")
    parser.add_argument("--train-prompts", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--judge-prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--judge-samples", type=int, default=4, help="Per judge prompt.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-words", type=int, default=30)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--dpo-lr", type=float, default=2e-4)
    parser.add_argument("--judge-steps", type=int, default=40)
    parser.add_argument("--judge-lr", type=float, default=3e-4)
    parser.add_argument("--skip-adapter-judge", action="store_true")
    args = parser.parse_args()

    from lorabay.hub.bases import resolve_base
    from lorabay.train.data import write_jsonl
    from lorabay.train.label.gateway import started_gateway

    args.base = str(resolve_base(args.base))
    work = Path(args.work or tempfile.mkdtemp(prefix="rlaif-bench-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    args.registry = f"file://{work / 'registry'}"
    os.environ.setdefault("LORABAY_HOME", str(work / "home"))
    loads = [os.getloadavg()[0]]
    begun = time.monotonic()
    splits = prompt_splits(args)
    train_file = write_jsonl([{"prompt": p} for p in splits["train"]], work / "prompts.jsonl")

    rows, timings = [], {}
    started = time.monotonic()
    serve_args = f"--served-name {args.served_name}"
    with started_gateway(args.base, args.registry, serve_args=serve_args, notify=print) as gateway:
        url = gateway.url
        timings["gateway_s"] = round(time.monotonic() - started)
        heldout = sample(url, args.served_name, splits["heldout"], args, args.samples)
        before = compliance(heldout, args.max_words)
        # The base as its own judge: at --threshold, and keeping every pair (0.5), so that
        # a DPO round runs on whatever its labels say.
        for threshold in sorted({args.threshold, 0.5}, reverse=True):
            name = "self" if threshold == args.threshold else f"self-{threshold:g}"
            rows.append(
                judge_row(name, url, args.served_name, threshold, splits, train_file, work,
                          args, before)
            )  # fmt: skip
        if not args.skip_adapter_judge:
            started = time.monotonic()
            judge, judge_data = train_judge(url, splits, work, args)
            timings["judge_train_s"] = round(time.monotonic() - started)
            row = judge_row("adapter", url, judge["pushed"]["ref"], args.threshold, splits,
                            train_file, work, args, before)  # fmt: skip
            row["judge_data"] = judge_data
            row["judge_metrics"] = judge["metrics"]
            rows.append(row)
    timings["total_s"] = round(time.monotonic() - begun)
    loads.append(os.getloadavg()[0])
    table = markdown(rows, args, loads)
    results = {"args": vars(args), "rows": rows, "timings": timings, "table": table}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    print(f"\nresults: {work / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the gateway is stopped by then (started_gateway)
        raise SystemExit(130) from None
