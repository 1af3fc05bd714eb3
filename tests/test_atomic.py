"""Tests for :mod:`specvlm_lit.utils.atomic`: publish whole directories, never delete what the project did not write."""

from __future__ import annotations

import json

import pytest

from specvlm_lit.errors import UserError
from specvlm_lit.utils.atomic import MARKER, ForeignDirectoryError, atomic_directory, check_replaceable


def _publish(target, files: dict[str, str], kind: str = "corpus", **kwargs) -> None:
    with atomic_directory(target, kind, **kwargs) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _contents(directory) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def test_publishes_a_new_directory_with_its_marker(tmp_path):
    target = tmp_path / "sub" / "out"
    _publish(target, {"a.txt": "1"})
    assert json.loads((target / MARKER).read_text()) == {"written_by": "specvlm-lit", "kind": "corpus"}
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in target.parent.iterdir()] == ["out"]  # no temp dir left behind


def test_refuses_a_user_directory_with_files_and_leaves_it_untouched(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    (target / "data").mkdir()
    (target / "data" / "x.csv").write_text("1,2")
    ran = []
    with pytest.raises(ForeignDirectoryError, match="mine.*not written by specvlm-lit.*remove it yourself") as err:
        with atomic_directory(target, "corpus"):
            ran.append(True)
    assert isinstance(err.value, UserError)
    assert not ran  # refused before the writer did any work
    assert (target / "thesis.tex").read_text() == "years of work" and (target / "data" / "x.csv").read_text() == "1,2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_refuses_a_file_and_a_directory_of_another_kind(tmp_path):
    a_file = tmp_path / "notes"
    a_file.write_text("keep")
    with pytest.raises(ForeignDirectoryError, match="not a directory"):
        _publish(a_file, {"a.txt": "1"})
    assert a_file.read_text() == "keep"
    corpus = tmp_path / "corpus"
    _publish(corpus, {"train.tar": "shards"}, kind="corpus")
    with pytest.raises(ForeignDirectoryError, match="holds a specvlm-lit corpus, not a drafter"):
        _publish(corpus, {"config.json": "{}"}, kind="drafter")
    assert (corpus / "train.tar").read_text() == "shards"


def test_replaces_its_own_marked_directory_and_an_empty_one(tmp_path):
    target = tmp_path / "out"
    _publish(target, {"old.txt": "old"})
    _publish(target, {"new.txt": "new"})
    assert _contents(target) == {MARKER: (target / MARKER).read_text(), "new.txt": "new"}
    empty = tmp_path / "empty"
    empty.mkdir()
    _publish(empty, {"a.txt": "1"})
    assert (empty / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_recognises_directories_older_versions_published_without_a_marker(tmp_path):
    target = tmp_path / "corpus"
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    (target / "train-000000.tar").write_text("old shard")
    has_manifest = lambda d: (d / "manifest.json").is_file()  # noqa: E731
    with pytest.raises(ForeignDirectoryError):
        check_replaceable(target, "corpus")
    _publish(target, {"manifest.json": "{}", "train-000000.tar": "new shard"}, published_before=has_manifest)
    assert (target / "train-000000.tar").read_text() == "new shard" and (target / MARKER).is_file()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_leaves_the_old_target_intact_and_no_temp_dir(tmp_path, error):
    target = tmp_path / "out"
    _publish(target, {"a.txt": "complete"})
    before = _contents(target)
    with pytest.raises(error):
        with atomic_directory(target, "corpus") as tmp:
            (tmp / "a.txt").write_text("half")
            raise error("killed while writing")
    assert _contents(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_publish_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    import os

    target = tmp_path / "out"
    _publish(target, {"a.txt": "complete"})
    before = _contents(target)
    real_rename = os.rename

    def rename(src, dst):  # the swap's second rename (temp dir -> target) fails
        if ".tmp-" in str(src):
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        _publish(target, {"a.txt": "new"})
    monkeypatch.undo()
    assert _contents(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
