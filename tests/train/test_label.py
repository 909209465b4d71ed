"""`lorabay label` without an engine: the constitution and its errors, the soft label from
log-probs with both orders, the journal, the provenance and what training records of it.
(tests/train/test_label_engine.py runs it against a real gateway.)"""

from __future__ import annotations

import json
import logging
import math

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.hub.errors import ConfigError
from lorabay.train.data import dataset_digest, write_jsonl
from lorabay.train.label.constitution import (
    ConstitutionError,
    comparison_messages,
    load_constitution,
    revision_messages,
)
from lorabay.train.label.judge import PairJudgement, Verdict, verdict_from_choice
from lorabay.train.label.provenance import data_provenance, provenance_path
from lorabay.train.label.run import Journal, build_label_config
from lorabay.train.label.teach import judge_sft_records

BAD_CONSTITUTION = """\
name: bad
principals: []
templates:
  comparison: "{question} {a} {c}"
principles:
  - name: kind
    comparison: Which is kind?
    critique: Is it unkind?
    revision: Make it kind.
    wieght: 2
  - name: kind
    comparison: ""
    critique: x
    revision: y
  - name: "bad name!"
    comparison: a
    critique: b
    revision: c
    weight: -1
"""


def test_the_shipped_constitution_is_valid_and_renders_every_mode():
    constitution = load_constitution()  # train/assets/constitution.yaml, package data
    assert constitution.name == "lorabay-assistant"
    assert {"concise", "honest"} <= {p.name for p in constitution.principles}
    assert constitution.digest.startswith("sha256:")
    concise = constitution.principle("concise")
    question = comparison_messages(constitution, concise, "What is 2+2?", "4", "It is 4.")
    text = question[0]["content"]
    assert "Response A:\n4\n" in text and "Response B:\nIt is 4." in text
    assert concise.comparison in text and text.endswith("Answer with the single letter A or B.")
    chat = [{"role": "user", "content": "Hi"}]
    revise = revision_messages(constitution, concise, chat, "Hello there!", "Too long.")
    assert [m["role"] for m in revise] == ["user", "assistant", "user", "assistant", "user"]
    assert revise[2]["content"] == concise.critique and concise.revision in revise[4]["content"]


def test_a_bad_constitution_gets_one_line_per_problem_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONSTITUTION)
    with pytest.raises(ConstitutionError) as caught:
        load_constitution(path)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"constitution {path}: 8 problems")
    assert lines[1:] == [
        "  line 2: unknown key 'principals' (did you mean 'principles'?)",
        "  line 4: templates.comparison: unknown placeholder {c} (allowed: {a}, {b}, {prompt}, "
        "{question})",
        "  line 4: templates.comparison: needs the placeholder {b}",
        "  line 10: principle 1 (kind): unknown key 'wieght' (did you mean 'weight'?)",
        "  line 12: principle 2 (kind): 'comparison' must be non-empty text",
        "  line 11: principle 2: name 'kind' is already principle 1's; names must differ",
        "  line 15: principle 3 (bad name!): name 'bad name!' may hold only letters, digits, "
        "'-', '_'",
        "  line 19: principle 3 (bad name!): 'weight' must be a number above 0",
    ]
    path.write_text("principles: [\n")
    with pytest.raises(ConstitutionError, match="line 2: not valid YAML"):
        load_constitution(path)


def test_label_reports_every_bad_option_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONSTITUTION)
    prompts = tmp_path / "p.jsonl"
    write_jsonl([{"prompt": "hi"}], prompts)
    args = ["label", "--prompts", str(prompts), "--policy", "p", "--out", str(tmp_path / "o.json")]
    args += ["--constitution", str(bad), "--samples", "1", "--threshold", "0.3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Error: lorabay label: 13 problems")
    for expected in (
        "--judge is required",
        "--threshold must be at least 0.5, got 0.3",
        "--base is needed without --endpoint",
        "--out " + str(tmp_path / "o.json") + ": write a .jsonl file",
        "--samples: prefs compares pairs, so it needs at least 2",
        f"--constitution {bad} line 2: unknown key 'principals'",
    ):
        assert any(line.strip().startswith(expected) for line in lines), (expected, lines)
    # With --endpoint the started gateway's options are refused, not ignored.
    args = ["label", "--prompts", str(prompts), "--policy", "p", "--judge", "j"]
    args += ["--out", str(tmp_path / "o.jsonl"), "--endpoint", "http://127.0.0.1:9"]
    args += ["--base", "./tiny", "--principles", "nope"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "--base is for the gateway `lorabay label` starts" in result.output
    assert "--principles 'nope' is not in the constitution" in result.output


def choice(*top: tuple[str, float]) -> dict:
    """An OpenAI chat choice's logprobs for one generated token (what the endpoint answers)."""
    entries = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
    return {"logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}


def test_the_soft_label_reads_the_answer_tokens_and_cancels_position_bias():
    verdict = verdict_from_choice(choice(("A", 0.6), (" A", 0.1), ("B", 0.1), ("The", 0.2)))
    assert verdict.p_a == pytest.approx(0.875) and verdict.mass == pytest.approx(0.8)
    assert verdict_from_choice(choice(("The", 0.9), ("Response", 0.1))) is None
    assert verdict_from_choice({"message": {"content": "A"}}) is None  # no logprobs asked

    # A judge that always answers A says nothing about the pair: both orders cancel.
    always_a = PairJudgement(Verdict(0.9, 1.0), Verdict(0.9, 1.0))
    assert always_a.p_x == pytest.approx(0.5) and not always_a.orders_agree
    # A judge that prefers x in both orders.
    prefers_x = PairJudgement(Verdict(0.9, 1.0), Verdict(0.2, 1.0))
    assert prefers_x.p_x == pytest.approx(0.85) and prefers_x.orders_agree
    assert prefers_x.confidence == pytest.approx(0.85)


def test_judge_training_records_teach_both_orders_and_leave_ties_out():
    constitution = load_constitution()
    examples = [("Hi", "short", "a much longer answer", True), ("Hi", "x", "y", None)]
    records = judge_sft_records(constitution, "concise", examples)
    assert len(records) == 2
    answers = {}
    for record in records:
        question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        first = question.split("Response A:\n", 1)[1].split("\n", 1)[0]
        answers[first] = answer
    assert answers == {"short": "A", "a much longer answer": "B"}


def test_journal_refuses_other_settings_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "labels.jsonl.partial"
    journal = Journal.open(path, {"seed": 0})
    journal.header["pins"] = {}
    journal.write({"index": 0, "records": [], "counts": {"prompts": 1}})
    journal.write({"index": 1, "records": [], "counts": {"prompts": 1}})
    with path.open("a") as f:
        f.write('{"index": 2, "rec')  # a kill in the middle of a line
    again = Journal.open(path, {"seed": 0})
    assert sorted(again.done) == [0, 1]
    assert path.read_text().endswith("}\n")
    with pytest.raises(ConfigError, match=r"other settings \(seed\).*--overwrite"):
        Journal.open(path, {"seed": 1})
    path.write_text('{"settings": {"seed": 0}}\nnot json\n')
    with pytest.raises(ConfigError, match="damaged.*--overwrite"):
        Journal.open(path, {"seed": 0})


def test_out_that_exists_needs_overwrite(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "labels.jsonl"
    write_jsonl([{"prompt": "hi"}], prompts)
    out.write_text("")
    flags = {"prompts": str(prompts), "policy": "p", "judge": "j", "out": str(out)}
    flags["endpoint"] = "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="exists: pass --overwrite"):
        build_label_config(flags)
    assert build_label_config({**flags, "overwrite": True}).overwrite


def write_labels(folder, provenance_digest=None):
    """A labelled file and the provenance `lorabay label` would write beside it."""
    data = write_jsonl([{"prompt": "Hi", "completion": " hello"}] * 8, folder / "labels.jsonl")
    provenance = {
        "kind": "lorabay.label",
        "schema": 1,
        "mode": "revise",
        "output": {"file": data.name, "digest": provenance_digest or dataset_digest(data)},
        "judge": {"requested": "team/judge", "ref": "team/judge:2", "digest": "sha256:" + "a" * 64},
        "policy": {"requested": "tiny", "served": "tiny", "kind": "base"},
        "constitution": {"name": "toy", "sha256": "sha256:" + "c" * 64},
        "counts": {"records": 8, "dropped_total": 1},
    }
    provenance_path(data).write_text(json.dumps(provenance))
    return data


def test_provenance_is_recorded_only_for_the_bytes_it_describes(tmp_path, caplog):
    data = write_labels(tmp_path)
    entry = data_provenance(data, dataset_digest(data))
    assert entry["judge"] == "team/judge:2@sha256:" + "a" * 64
    assert entry["policy"] == "tiny"
    assert entry["constitution_sha256"] == "sha256:" + "c" * 64
    assert entry["made_by"] == "lorabay label --mode revise"
    assert entry["provenance"] == "labels.provenance.json"
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "edited", "completion": " by hand"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="lorabay.train"):
        assert data_provenance(data, dataset_digest(data)) is None
    assert "describes other data" in caplog.text
    assert data_provenance(tmp_path / "other.jsonl", "sha256:0") is None  # no provenance


@pytest.mark.slow
def test_training_on_labelled_data_pushes_its_provenance(train, tmp_path):
    data = write_labels(tmp_path)
    result = train("sft", data=str(data), output=str(tmp_path / "run"), max_steps=2, push="t/x")
    entry = data_provenance(data, dataset_digest(data))
    assert result.lineage["dataset_provenance"] == entry
    shown = CliRunner().invoke(cli, ["hub", "show", "t/x:1", "--json"])
    assert json.loads(shown.stdout)["lineage"]["dataset_provenance"] == entry
    shown = CliRunner().invoke(cli, ["hub", "show", "t/x:1"])
    assert "constitution_sha256" in shown.output and "team/judge:2@sha256" in shown.output
