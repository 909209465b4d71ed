"""DPO against RLHF (reward model + PPO): wall time and peak memory on the same data and base.

    .venv/bin/python bench/align_bench.py                    # tiny base, 256 pairs, ~4 min
    .venv/bin/python bench/align_bench.py --size small --pairs 16 --batch-size 8 --sft-steps 4 \
        --repeat 2                                           # 155M base, ~6 min on 2 cores
    .venv/bin/python bench/align_bench.py --answer-words 16 --max-new-tokens 48 \
        --sft-steps 240 --repeat 1                           # long answers, ~2 min

The seed's claim: "DPO compute 1x, RLHF 3-5x". One run, one base, one preference set
(the sentiment toy of train/toy.py), one starting policy (an SFT adapter trained first,
not counted). Then, each in a fresh process, one epoch over the same pairs:

- dpo: ``lorabay train dpo --from SFT`` (the reference: SFT frozen beside the copy);
- reward: ``lorabay train reward`` on the pairs (Bradley-Terry, a LoRA + scalar head);
- ppo: ``lorabay train rlhf --policy SFT --reward RM`` with the pairs' prompts, one
  rollout batch per --batch-size prompts, 4 PPO epochs per batch (the defaults), the
  critic a value head on the policy's hidden states (lorabay's default);
- ppo_critic: the same with ``--value-model adapter``, the critic a value model trained
  by its own pass (its own LoRA on the same base), as InstructGPT's PPO and the classic
  setup behind the claim run it;

and an ``idle`` process that only loads the base and runs one forward, whose peak memory
is the floor every process pays (Python, torch, the base's weights). Times: the training loop (``train_runtime``, as
the Trainer and train/ppo.py report it) and the whole training call "with setup"
(imports, loading the model, the trainer's setup, saving; interpreter start excluded).
Peak memory is the process's peak RSS (``ru_maxrss``); "above idle" subtracts the idle
process's. RLHF = reward + ppo (or ppo_critic), one after the other: times add, memory is
the larger peak.
Every phase runs --repeat times, interleaved with the others; the fastest round counts
(on a shared machine a neighbour's burst can double one round).
Prints a markdown table (bench/README.md keeps the latest one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The same adapter shape and learning rates as the toy tests (tests/train/aligntools.py).
COMMON = {"targets": "all-linear", "dropout": 0.0, "logging_steps": 5, "overwrite": True}
PHASES = ("idle", "dpo", "reward", "ppo", "ppo_critic")
PPO_EPOCHS = 4  # RLHFConfig's default, kept


def phase_flags(phase: str, work: Path, args) -> dict:
    """The run each phase trains: one epoch over the same pairs, the same batch size."""
    toy = "long" if args.answer_words else "sentiment"
    data = str(work / "toy" / f"{toy}-pairs-train.jsonl")
    sft = str(work / "runs" / "sft" / "adapter")
    base = {"base": str(work / "base"), "output": str(work / "runs" / phase)}
    epoch = {"epochs": 1, "batch_size": args.batch_size}
    if phase == "idle":
        return base
    if phase == "sft":
        data = str(work / "toy" / f"{toy}-sft.jsonl")
        return {**base, **COMMON, "data": data, "lr": 1e-3, "max_steps": args.sft_steps}
    if phase == "dpo":
        extra = {"dropout": 0.0, "logging_steps": 5, "overwrite": True}
        return {**base, **epoch, **extra, "data": data, "from": sft, "lr": 1e-3, "beta": 0.1}
    if phase == "reward":
        # The score-head format the README's tables measured (--format head, issue 16).
        return {**base, **COMMON, **epoch, "data": data, "lr": 1e-3, "format": "head"}
    if phase in ("ppo", "ppo_critic"):
        reward = str(work / "runs" / "reward" / "adapter")
        critic = {"value_model": "adapter"} if phase == "ppo_critic" else {}
        return {
            **critic,
            **base,
            **epoch,
            "prompts": data,
            "policy": sft,
            "reward": reward,
            "lr": 5e-4,
            "temperature": 0.3,
            "max_new_tokens": args.max_new_tokens,
            "overwrite": True,
        }
    raise ValueError(phase)


def write_long_toy(folder: Path, pairs: int, words: int, seed: int = 0) -> None:
    """Preference pairs with long answers: "Reverse: w1 .. wN" -> the N words reversed
    (chosen) or as given (rejected), and the SFT records for the starting policy."""
    import random

    from lorabay.train.data import write_jsonl
    from lorabay.train.toy import NOUNS, as_preference, as_record

    rng = random.Random(seed)
    questions = [[rng.choice(NOUNS) for _ in range(words)] for _ in range(pairs)]
    triples = [("Reverse: " + " ".join(q), " ".join(q[::-1]), " ".join(q)) for q in questions]
    write_jsonl([as_preference(*t, "messages") for t in triples], folder / "long-pairs-train.jsonl")
    write_jsonl(
        [as_record(q, right, "messages") for q, right, _ in triples], folder / "long-sft.jsonl"
    )


def run_phase(phase: str, flags: dict) -> dict:
    """In this process: train ``phase`` and report seconds, steps and peak RSS."""
    from lorabay.train.config import build_config
    from lorabay.train.methods import METHODS

    started = time.perf_counter()
    steps = 0
    if phase == "idle":
        import torch

        from lorabay.train.model import load_base

        model, tokenizer = load_base(flags["base"])
        with torch.no_grad():  # one forward: every weight read (loading may only map them)
            model(**tokenizer("the base, loaded and used once", return_tensors="pt"))
    else:
        method = METHODS[{"ppo": "rlhf", "ppo_critic": "rlhf"}.get(phase, phase)]
        config = build_config(method.config, flags=flags)
        result = method.train(config, show_progress=False)
        steps = result.metrics["steps"]
    seconds = time.perf_counter() - started
    loop = result.metrics["train_runtime"] if phase != "idle" else 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    report = {"phase": phase, "seconds": seconds, "loop": loop, "steps": steps}
    if phase.startswith(
        "ppo"
    ):  # where PPO's steps spent their time (train/ppo.py logs it per step)
        from lorabay.train.progress import read_metrics

        rows = read_metrics(Path(flags["output"]) / "metrics.jsonl")
        for part in ("generate", "score", "update"):
            report[part] = sum(row.get(f"time_{part}", 0.0) for row in rows)
        report["response_length"] = sum(
            row["response_length"] for row in rows if "response_length" in row
        ) / max(1, sum("response_length" in row for row in rows))
    return {**report, "peak_rss_mib": peak}


def spawn(phase: str, flags: dict) -> dict:
    """Run one phase in a fresh Python process (a clean peak RSS); its JSON report."""
    command = [sys.executable, __file__, "--phase", phase, "--flags", json.dumps(flags)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(reports: dict, args) -> str:
    idle = reports["idle"]["peak_rss_mib"]
    dpo = reports["dpo"]
    reward, ppo, ppo_critic = reports["reward"], reports["ppo"], reports["ppo_critic"]

    def after_reward(ppo_run: dict) -> dict:
        return {
            "steps": "-",
            "loop": reward["loop"] + ppo_run["loop"],
            "seconds": reward["seconds"] + ppo_run["seconds"],
            "peak_rss_mib": max(reward["peak_rss_mib"], ppo_run["peak_rss_mib"]),
        }

    rlhf, rlhf_critic = after_reward(ppo), after_reward(ppo_critic)
    rows = [
        "| run | steps | training loop | x DPO | with setup | x DPO | peak RSS | above idle "
        "| x DPO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, report: dict) -> str:
        above = report["peak_rss_mib"] - idle
        return (
            f"| {name} | {report['steps']} | {report['loop']:.1f} s | "
            f"{report['loop'] / dpo['loop']:.2f}x | {report['seconds']:.1f} s | "
            f"{report['seconds'] / dpo['seconds']:.2f}x | {report['peak_rss_mib']:.0f} MiB | "
            f"{above:.0f} MiB | {above / max(dpo['peak_rss_mib'] - idle, 1):.2f}x |"
        )

    rows.append(row("DPO (baseline)", dpo))
    rows.append(row("reward model", reward))
    rows.append(row("PPO (lorabay: value head on the policy)", ppo))
    rows.append(row("PPO with a value model (InstructGPT: `--value-model adapter`)", ppo_critic))
    rows.append(row("**RLHF = reward model + PPO**", rlhf))
    rows.append(row("**RLHF with a value model = reward model + that PPO**", rlhf_critic))
    rows.append(
        f"| idle (load the base, one forward) | - | - | - | {reports['idle']['seconds']:.1f} s | - "
        f"| {idle:.0f} MiB | 0 MiB | - |"
    )
    parts = {part: ppo[part] / ppo["loop"] for part in ("generate", "score", "update")}
    claims = [rlhf["loop"] / dpo["loop"], rlhf_critic["loop"] / dpo["loop"]]
    verdicts = ["inside" if 3 <= claim <= 5 else "outside" for claim in claims]
    rows.append("")
    rows.append(
        f"RLHF / DPO training-loop time: **{claims[0]:.2f}x** ({verdicts[0]} the claimed 3-5x) "
        f"with lorabay's value head, **{claims[1]:.2f}x** ({verdicts[1]}) with a value model; "
        f"{args.pairs} pairs"
        + (f" (answers of {args.answer_words} words)" if args.answer_words else "")
        + f", batch {args.batch_size}, base {args.size}, "
        f"best of {args.repeat} rounds, "
        f"PPO responses up to {args.max_new_tokens} tokens."
    )
    rows.append(
        f"PPO's loop: {parts['generate']:.0%} sampling responses (mean length "
        f"{ppo['response_length']:.1f} tokens), {parts['score']:.0%} policy/reference/reward "
        f"passes, {parts['update']:.0%} PPO updates ({PPO_EPOCHS} passes per batch)."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--pairs", type=int, default=256, help="preference pairs (one epoch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--answer-words",
        type=int,
        default=0,
        help="long answers: pairs 'Reverse: N words' instead of the sentiment toy (0)",
    )
    parser.add_argument(
        "--sft-steps", type=int, default=60, help="steps of the starting policy (not counted)"
    )
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: temporary)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each phase keeps its best")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--flags", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # a child process: one phase
        print(json.dumps(run_phase(args.phase, json.loads(args.flags))))
        return

    from lorabay.train.base import create_base
    from lorabay.train.toy import write_align_toy

    work = Path(args.workdir or tempfile.mkdtemp(prefix="align-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not (work / "base" / "config.json").is_file():  # a kept --workdir reuses its base
        create_base(work / "base", size=args.size, seed=0)
    write_align_toy(work / "toy", train=args.pairs, heldout=8)
    if args.answer_words:
        write_long_toy(work / "toy", args.pairs, args.answer_words)
    print(f"base {args.size}, {args.pairs} pairs, work in {work}", file=sys.stderr)
    spawn("sft", phase_flags("sft", work, args))  # the shared starting policy, not counted
    # Rounds interleave the phases, so a burst of load from elsewhere hits all of them alike;
    # each phase keeps its fastest round (the least disturbed one).
    reports: dict[str, dict] = {}
    for round_ in range(args.repeat):
        for phase in PHASES:
            report = spawn(phase, phase_flags(phase, work, args))
            print(f"round {round_ + 1} {phase}: {report}", file=sys.stderr)
            if phase not in reports or report["seconds"] < reports[phase]["seconds"]:
                reports[phase] = report
    print(
        f"\n{platform.node()} / {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(table(reports, args))


if __name__ == "__main__":
    main()
