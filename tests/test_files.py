"""write_atomic: a reader sees the old file or the new one, and a failed write leaves the old
file and no temporary behind."""

import os

import pytest

from tokenmill.files import write_atomic


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    write_atomic(path, "old")
    write_atomic(path, b"new bytes", durable=True)
    assert path.read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    write_atomic(path, "old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
