"""carbonscale.atomicfile: a file replaced whole, or not at all."""

from __future__ import annotations

import os

import pytest

from carbonscale.atomicfile import write_atomically


def test_text_bytes_and_chunks_replace_the_file(tmp_path):
    path = tmp_path / "state.json"
    write_atomically(path, "first\n")
    assert path.read_text() == "first\n"
    assert os.stat(path).st_mode & 0o777 == 0o600  # private unless a mode is given
    write_atomically(str(path), b"second\n", 0o644, durable=True)
    assert path.read_bytes() == b"second\n" and os.stat(path).st_mode & 0o777 == 0o644
    write_atomically(path, (bytes([i]) * 3 for i in range(97, 100)))
    assert path.read_bytes() == b"aaabbbccc"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "plan"
    path.write_bytes(b"old")

    def chunks():
        yield b"half of a new "
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, chunks())
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["plan"]
