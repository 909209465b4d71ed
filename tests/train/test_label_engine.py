"""`lorabay label` against a real gateway on the tiny base (issue 17's acceptance tests).

The toy world: prompts "Praise: cat tree" answered with one word; the rule (a constitution
of one principle, `kind`) is that the kinder answer is the better one: a kind word
(train/toy.py GOOD) beats anything else, an unkind word (BAD) loses to anything else, and
two answers of the same kind (or two stray tokens, neither kind nor unkind) are a tie.
A policy SFT-trained to answer kind or unkind words at even odds is what labelling and DPO
improve; a judge adapter trained on the rule's comparisons (train/label/teach.py, both
orders) is what judges. One gateway serves both for the whole module; a second test
starts its own through `lorabay label` (no --endpoint), stops it with ctrl-C midway, and
the run is resumed.

Sampling: the tiny base is a random init whose lm_head caps one token near 7% at
temperature 1 (tests/train/aligntools.py), so the policy is sampled at temperature 0.3,
where its trained words hold most of the mass, and top-p 0.8, which cuts the tail of stray
tokens and empty answers (measured with transformers: 59% kind, 41% unkind, nothing else).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabay.train.data import load_records, write_jsonl
from lorabay.train.toy import BAD, GOOD, NOUNS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# The comparison is put tersely: a 2-layer random base learns "which slot holds the kind
# word" this way (the default English template takes as long but also keeps some ties it
# should drop). The judge's loss sits on a plateau (A or B, at even odds) until about step
# 220, then falls to the rule within 30 steps; 400 steps leave room (a reworded question
# moved the drop past 300 once).
CONSTITUTION = """\
name: toy-kindness
description: One rule the tiny judge is trained on - the kinder answer is the better one.
templates:
  comparison: "{question}\\n{prompt}\\nA: {a}\\nB: {b}"
principles:
  - name: kind
    comparison: Which response is kind?
    critique: Is the response unkind?
    revision: Rewrite the response to be kind.
"""
WORDS = GOOD + BAD
TINY = ["--threads", "1", "--batch-size", "16", "--dropout", "0", "--logging-steps", "5"]
TINY += ["--scheduler", "constant"]
NEW_ADAPTER = ["--targets", "all-linear"]
SAMPLING = ["--temperature", "0.3", "--top-p", "0.8", "--max-tokens", "4"]


def kindness(text: str) -> int:
    """The rule, as a script checks it: 1 kind, -1 unkind, 0 anything else."""
    word = text.strip()
    return 1 if word in GOOD else -1 if word in BAD else 0


def complies(text: str) -> bool:
    return kindness(text) == 1


def run_cli(*args: str) -> dict:
    """``lorabay ARGS --json`` in-process; its JSON answer."""
    from lorabay.cli.main import cli

    result = CliRunner().invoke(cli, [*args, "--json"])
    if result.exit_code != 0:
        raise AssertionError(result.output[-3000:]) from result.exception
    try:  # one JSON document (hub show indents it), or progress lines and then one
        return json.loads(result.stdout)
    except ValueError:
        return json.loads(result.stdout.strip().splitlines()[-1])


class LabelWorld:
    """The prompts, constitution, trained policy and judge, and the gateway serving them."""

    def __init__(self, base: Path, root: Path):
        self.base, self.root = base, root
        self.registry = f"file://{root / 'registry'}"
        prompts = [f"Praise: {a} {b}" for a in NOUNS for b in NOUNS if a != b]  # 380
        random.Random(0).shuffle(prompts)
        # judge training | labels for DPO | held out from both
        self.split = {"judge": prompts[:150], "train": prompts[150:300], "heldout": prompts[300:]}
        self.constitution = root / "kindness.yaml"
        self.constitution.write_text(CONSTITUTION)
        self.url: str | None = None
        self.metrics_url: str | None = None

    def prompts_file(self, split: str, count: int | None = None) -> Path:
        path = self.root / f"prompts-{split}-{count}.jsonl"
        if not path.exists():
            write_jsonl([{"prompt": p} for p in self.split[split][:count]], path)
        return path

    def train(self, method: str, name: str, *args: str) -> dict:
        output = str(self.root / "runs" / f"{method}-{name.replace('/', '-')}")
        common = ["--base", str(self.base), "--output", output, "--registry", self.registry]
        return run_cli("train", method, *common, *TINY, *args, "--push", name)

    @functools.cached_property
    def policy(self) -> dict:
        """Answers a kind or an unkind word at even odds: about half its answers comply."""
        rng = random.Random(1)
        records = [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": w}]}
            for p in self.split["judge"] + self.split["train"]
            for w in rng.sample(WORDS, 2)
        ]
        data = write_jsonl(records, self.root / "policy-sft.jsonl")
        args = ["--data", str(data), *NEW_ADAPTER, "--lr", "1e-3", "--max-steps", "150"]
        return self.train("sft", "toy/policy", *args)

    @functools.cached_property
    def judge(self) -> dict:
        """Trained on the rule's comparisons for the judge split's prompts: a kind word
        against an unkind word or a noun, in random order (against unkind words only it
        learns "the unkind one loses" as much as "the kind one wins")."""
        from lorabay.train.label.constitution import load_constitution
        from lorabay.train.label.teach import judge_sft_records

        rng = random.Random(2)
        examples = []
        for _ in range(2000):
            kind, other = rng.choice(GOOD), rng.choice(BAD + NOUNS)
            x_kind = rng.random() < 0.5
            x, y = (kind, other) if x_kind else (other, kind)
            examples.append((rng.choice(self.split["judge"]), x, y, x_kind))
        records = judge_sft_records(load_constitution(self.constitution), "kind", examples)
        data = write_jsonl(records, self.root / "judge-sft.jsonl")
        args = ["--data", str(data), *NEW_ADAPTER, "--lr", "2e-3", "--max-steps", "400"]
        return self.train("sft", "toy/judge", *args)

    def label(self, split: str, count: int, out: str, *args: str) -> dict:
        """`lorabay label` against the module's gateway."""
        common = ["--endpoint", self.url, "--prompts", str(self.prompts_file(split, count))]
        common += ["--constitution", str(self.constitution), "--out", str(self.root / out)]
        return run_cli("label", *common, *args)

    def judge_requests(self) -> float:
        """Requests the gateway answered for the judge adapter so far (its metrics port)."""
        import httpx

        total = 0.0
        for line in httpx.get(self.metrics_url, timeout=10).text.splitlines():
            if line.startswith("lorabay_requests_total{") and 'adapter="toy/judge"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def sample(self, model: str, prompts: list[str], n: int) -> list[list[str]]:
        """``n`` responses of ``model`` to each prompt, asked as a user of the gateway asks:
        with the OpenAI client (8 requests at a time)."""
        import asyncio

        from openai import AsyncOpenAI

        async def run():
            client = AsyncOpenAI(base_url=f"{self.url}/v1", api_key="not-needed-on-loopback")
            slots = asyncio.Semaphore(8)

            async def ask(prompt: str) -> list[str]:
                async with slots:
                    reply = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}], n=n,
                        temperature=0.3, top_p=0.8, max_tokens=4,
                    )  # fmt: skip
                return [choice.message.content or "" for choice in reply.choices]

            try:
                return await asyncio.gather(*(ask(p) for p in prompts))
            finally:
                await client.close()

        return asyncio.run(run())

    def judge_prefers(self, prompts: list[str], xs: list[str], ys: list[str]) -> float:
        """Mean probability, by the judge (both orders), that x is the better answer."""
        import asyncio

        from lorabay.train.label.client import Endpoint
        from lorabay.train.label.constitution import load_constitution
        from lorabay.train.label.modes import Job, judge_pair

        constitution = load_constitution(self.constitution)
        principle = constitution.principle("kind")

        async def run():
            async with Endpoint(self.url, concurrency=8) as endpoint:
                judge = await endpoint.pin("toy/judge")
                job = Job(
                    endpoint=endpoint, policy=judge, judge=judge, constitution=constitution,
                    samples=1, temperature=0, top_p=1, max_tokens=1, judge_max_tokens=1,
                    judge_temperature=0, threshold=0.5, principles=(), seed=0,
                )  # fmt: skip
                return await asyncio.gather(
                    *(
                        judge_pair(job, principle, p, x, y)
                        for p, x, y in zip(prompts, xs, ys, strict=True)
                    )
                )

        judgements = asyncio.run(run())
        return sum(j.p_x if j else 0.5 for j in judgements) / len(judgements)


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    from lorabay.train.label.gateway import started_gateway

    world = LabelWorld(tiny_base, tmp_path_factory.mktemp("label"))
    assert world.policy and world.judge  # trained (and pushed) before the gateway starts
    serve_args = "--served-name tiny --dtype float32 --metrics-port 0"
    with started_gateway(str(tiny_base), world.registry, serve_args=serve_args) as gateway:
        world.url, world.metrics_url = gateway.url, gateway.metrics_url
        yield world


def test_prefs_agree_with_the_rule_and_ask_both_orders(world):
    before = world.judge_requests()
    result = world.label("heldout", 64, "heldout-labels.jsonl", "--policy", "toy/policy",
                         "--judge", "toy/judge", "--samples", "3", "--threshold", "0.7",
                         *SAMPLING)  # fmt: skip
    counts = result["counts"]
    records = load_records(world.root / "heldout-labels.jsonl")
    assert len(records) == counts["records"] >= 40, counts
    # Agreement with the rule on the kept held-out pairs: the chosen answer is the kinder.
    agree = [kindness(r["chosen"][0]["content"]) > kindness(r["rejected"][0]["content"])
             for r in records]  # fmt: skip
    assert sum(agree) / len(agree) >= 0.9, (sum(agree), len(agree), counts)
    # Pairs the rule does not separate (both kind, both unkind) come out near 0.5: dropped.
    assert counts["dropped_low_confidence"] > 0 and counts["pairs"] == 3 * 64
    # Both orders were asked: two judge requests per judged pair (plus the run's one request
    # that pins the judge's version), seen by the gateway itself, and each record says what
    # each order answered.
    assert counts["judgements"] == 2 * counts["judged"]
    assert world.judge_requests() - before == counts["judgements"] + 1
    for record in records:  # the score is the mean of the two orders' answers
        orders = record["orders"]
        mean = (orders["chosen_as_a"] + orders["chosen_as_b"]) / 2
        assert record["score"] == pytest.approx(mean, abs=1e-5) and record["score"] >= 0.7
        assert record["principle"] == "kind"
    # A judge led by position answers A (or B) nearly always: 1.0 (or 0.0). This one leans
    # to B on pairs it cannot tell apart (0.34-0.40 in five runs) and follows the rule on
    # the rest.
    assert 0.25 <= counts["first_position_rate"] <= 0.75
    # Provenance: pinned versions, the constitution's digest, the settings, the counts.
    provenance = json.loads((world.root / "heldout-labels.provenance.json").read_text())
    assert provenance["judge"]["ref"] == "toy/judge:1"
    assert provenance["judge"]["served"] == f"toy/judge@{world.judge['pushed']['digest']}"
    assert provenance["policy"]["digest"] == world.policy["pushed"]["digest"]
    assert provenance["constitution"]["name"] == "toy-kindness"
    assert provenance["sampling"]["samples"] == 3 and provenance["sampling"]["temperature"] == 0.3
    assert provenance["counts"] == counts


def test_dpo_on_the_labels_raises_compliance_and_records_where_they_came_from(world):
    labels = world.label("train", 150, "train-labels.jsonl", "--policy", "toy/policy",
                         "--judge", "toy/judge", "--samples", "3", "--threshold", "0.7",
                         *SAMPLING)  # fmt: skip
    assert labels["counts"]["records"] >= 100, labels["counts"]
    data = str(world.root / "train-labels.jsonl")
    dpo = world.train("dpo", "toy/policy", "--data", data, "--from", "toy/policy:1",
                      "--lr", "1e-3", "--beta", "0.1", "--max-steps", "30")  # fmt: skip
    assert dpo["pushed"]["ref"] == "toy/policy:2"

    heldout = world.split["heldout"][:64]
    before = world.sample("toy/policy:1", heldout, 4)
    after = world.sample("toy/policy:2", heldout, 4)

    def rate(answers):
        return sum(complies(a) for batch in answers for a in batch) / sum(map(len, answers))

    assert rate(after) >= rate(before) + 0.2, (rate(before), rate(after))
    # As the judge scores it: asked about one answer of each policy per held-out prompt,
    # it prefers the DPO policy's.
    preferred = world.judge_prefers(heldout, [a[0] for a in after], [b[0] for b in before])
    assert preferred > 0.6, preferred

    # The lineage says where the labels came from; `hub show` prints it.
    lineage = dpo["lineage"]["dataset_provenance"]
    assert lineage["constitution_sha256"] == labels["constitution"]["sha256"]
    assert lineage["judge"] == f"toy/judge:1@{world.judge['pushed']['digest']}"
    assert lineage["made_by"] == "lorabay label --mode prefs"
    shown = run_cli("hub", "show", "toy/policy:2", "--registry", world.registry)
    assert shown["lineage"]["dataset_provenance"] == lineage


def test_revise_with_its_own_gateway_stops_on_ctrl_c_and_resumes(world, tmp_path):
    """No --endpoint: `lorabay label` starts `lorabay serve` itself. A ctrl-C midway stops it
    (nothing left running), keeps the finished prompts, and the same command continues."""
    import psutil

    from lorabay.train.label.run import journal_path

    out = tmp_path / "revised.jsonl"
    mode = ["--mode", "revise", "--policy", "toy/policy:1", "--judge", "tiny", *SAMPLING]
    mode += ["--judge-max-tokens", "6"]
    args = [*mode, "--prompts", str(world.prompts_file("heldout", 40)), "--out", str(out)]
    args += ["--constitution", str(world.constitution)]
    command = [sys.executable, "-m", "lorabay.cli.main", "label", *args, "--concurrency", "1"]
    command += ["--base", str(world.base), "--registry", world.registry]
    command += ["--serve-args", "--served-name tiny --dtype float32"]
    # As from a terminal: a suite started in the background (`make test &`, CI's shell)
    # ignores SIGINT, a child inherits that, and Python then never raises
    # KeyboardInterrupt (the label run finished, exit 0, in two such runs). A handled
    # signal is reset to its default at exec: handle it here while the child starts.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        label = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    seen: dict[int, psutil.Process] = {}
    commands: list[str] = []
    journal = journal_path(out)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and label.poll() is None:
            for child in psutil.Process(label.pid).children(recursive=True):
                if child.pid not in seen:  # the gateway and its engine
                    seen[child.pid] = child
                    with contextlib.suppress(psutil.Error):
                        commands.append(" ".join(child.cmdline()))
            if journal.exists() and len(journal.read_text().splitlines()) >= 5:
                break  # settings, session, and three prompts done
            time.sleep(0.1)
        assert label.poll() is None, label.stdout.read()
        label.send_signal(signal.SIGINT)
        output, _ = label.communicate(timeout=120)
    finally:
        if label.poll() is None:
            label.kill()
    assert label.returncode == 130, output
    assert "run the same command to continue" in output
    assert any("vllm.entrypoints.openai.api_server" in command for command in commands)
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "left running"
    assert not out.exists()
    done = len(journal.read_text().splitlines()) - 2
    assert 3 <= done < 40

    # The same options against the module's gateway (same base, same pinned versions).
    resumed = world.label("heldout", 40, str(out), *mode)
    assert resumed["resumed"] >= done and not journal.exists()
    records = load_records(out)
    assert [r["prompt"][0]["content"] for r in records][:3] == world.split["heldout"][:3]
    assert resumed["counts"]["prompts"] == 40 == len(records) + resumed["counts"]["dropped_total"]
    for record in records:
        assert record["completion"][0]["role"] == "assistant" and record["completion"][0]["content"]
        assert record["principle"] == "kind" and "critique" in record
    from lorabay.train.data import detect_shape

    assert detect_shape(records, "sft") == "prompt_completion"  # what `train sft` reads
    assert len(resumed["endpoints"]) == 2  # the started gateway, then the module's
    assert resumed["judge"] == {"requested": "tiny", "served": "tiny", "kind": "base"}
