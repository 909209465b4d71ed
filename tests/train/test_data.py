"""Training data: JSONL and Parquet, the accepted shapes, every bad record reported."""

from __future__ import annotations

import json

import pytest

from lorabay.hub.errors import ConfigError
from lorabay.train.data import dataset_digest, detect_shape, load_dataset, load_records, write_jsonl

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    ("kind", "record", "shape"),
    [
        ("sft", {"prompt": "a", "completion": "b"}, "prompt_completion"),
        ("sft", {"prompt": CHAT[:1], "completion": CHAT[1:]}, "prompt_completion"),
        ("sft", {"messages": CHAT}, "messages"),
        ("preference", {"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        (
            "preference",
            {"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": CHAT[1:]},
            "preference",
        ),
        ("preference", {"chosen": CHAT, "rejected": CHAT}, "implicit_preference"),
    ],
)
def test_accepted_shapes(kind, record, shape):
    assert detect_shape([record], kind) == shape


def test_every_bad_record_named_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "a", "completion": "b"},
                {"prompt": "a"},
                {"prompt": "", "completion": "b"},
                {"prompt": CHAT[:1], "completion": "text"},
                {"prompt": [{"role": "robot", "content": "x"}], "completion": CHAT[1:]},
            ]
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_dataset(path, "sft")
    text = str(caught.value)
    assert "record 2: missing completion" in text
    assert "record 3: prompt must be non-empty text" in text
    assert "record 4: completion mixes text and message lists" in text
    assert "record 5: prompt: message 0 role 'robot'" in text
    assert "record 1" not in text


def test_wrong_shape_names_the_expected_one(tmp_path):
    path = write_jsonl([{"text": "hello"}], tmp_path / "lm.jsonl")
    with pytest.raises(ConfigError, match='"completion"'):
        load_dataset(path, "sft")
    with pytest.raises(ConfigError, match="chosen"):
        load_dataset(
            write_jsonl([{"prompt": "a", "completion": "b"}], tmp_path / "p.jsonl"), "preference"
        )


def test_invalid_json_lines_are_listed(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n\n{"prompt": \n')
    with pytest.raises(ConfigError) as caught:
        load_records(path)
    assert "line 2" in str(caught.value) and "line 4" in str(caught.value)


def test_parquet_and_jsonl_give_the_same_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": CHAT}, {"messages": list(reversed(CHAT))}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    write_jsonl(records, tmp_path / "d.jsonl")
    from_parquet, shape = load_dataset(tmp_path / "d.parquet", "sft")
    from_jsonl, _ = load_dataset(tmp_path / "d.jsonl", "sft")
    assert shape == "messages"
    assert from_parquet.to_list() == from_jsonl.to_list() == records


def test_digest_is_of_the_bytes(tmp_path):
    a = write_jsonl([{"prompt": "a", "completion": "b"}], tmp_path / "a.jsonl")
    b = write_jsonl([{"prompt": "a", "completion": "b"}], tmp_path / "b.jsonl")
    c = write_jsonl([{"prompt": "a", "completion": "c"}], tmp_path / "c.jsonl")
    assert dataset_digest(a) == dataset_digest(b) != dataset_digest(c)
    assert dataset_digest(a).startswith("sha256:") and len(dataset_digest(a)) == 71
