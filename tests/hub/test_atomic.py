"""Atomic writes (hub/atomic.py): a reader sees the old thing or the new one, never half."""

from __future__ import annotations

import pytest

from lorabay.hub.atomic import replacing_folder, write_atomically


def test_a_file_is_replaced_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "recipe.yaml"
    write_atomically(path, "lr: 1\n")
    write_atomically(path, b"lr: 2\n")
    assert path.read_text() == "lr: 2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["recipe.yaml"]


def test_a_failed_file_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomically(path, None)  # fails after the temporary file is opened
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with replacing_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert [p.name for p in target.iterdir()] == ["a.txt"]

    with pytest.raises(RuntimeError), replacing_folder(target) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("killed while saving")
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # the old folder, untouched

    with replacing_folder(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c.txt"]  # the old one is gone, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left beside it
