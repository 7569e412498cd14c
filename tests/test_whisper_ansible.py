"""library/whisper_fill run by ansible-playbook against localhost: check mode
writes nothing and reports what would be filled, a run fills and verifies, a
second run changes nothing, a corrupt source fails the task with the reason."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import whisper
from ansible_runner import module_task

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"
needs_ansible = pytest.mark.skipif(not PLAYBOOK_BIN.exists(), reason="ansible is not installed")
SCHEMA = [(60, 120), (600, 100)]


def playbook(tmp_path: Path, args: str, *extra: str) -> dict:
    return module_task(tmp_path, "whisper_fill", args, *extra)


def trees(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for index in range(6):
        relative = Path(f"servers/h{index % 2}/m{index}.wsp")
        for tree in (src, dst):
            (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        whisper.create(str(src / relative), SCHEMA)
        whisper.update_many(
            str(src / relative), [(time.time() - i * 60, float(i)) for i in range(5, 100)]
        )
        if index:
            whisper.create(str(dst / relative), SCHEMA)
            whisper.update_many(
                str(dst / relative), [(time.time() - i * 60, 0.0) for i in range(5)]
            )
    return src, dst


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@needs_ansible
def test_module_check_mode_fill_verify_and_idempotence(tmp_path):
    src, dst = trees(tmp_path)
    args = f"        src: {src}\n        dst: {dst}\n        jobs: 2\n"
    before = snapshot(dst)
    checked = playbook(tmp_path, args, "--check")
    assert checked["changed"] is True and not checked.get("failed")
    assert checked["copied"] == 1 and checked["filled"] == 5 and checked["points"] > 0
    assert snapshot(dst) == before, "check mode must not write"

    applied = playbook(tmp_path, args)
    assert applied["changed"] is True and not applied.get("failed"), applied
    assert applied["verify"]["ok"] is True and applied["verify"]["points_missing"] == 0
    assert (dst / "servers/h0/m0.wsp").read_bytes() == (src / "servers/h0/m0.wsp").read_bytes()

    again = playbook(tmp_path, args)
    assert again["changed"] is False and again["points"] == 0


@needs_ansible
def test_module_fails_on_a_corrupt_source_with_the_reason(tmp_path):
    src, dst = trees(tmp_path)
    with open(src / "servers/h1/m1.wsp", "r+b") as handle:
        handle.truncate(40)
    result = playbook(tmp_path, f"        src: {src}\n        dst: {dst}\n")
    assert result["failed"] is True
    assert "1 file(s) skipped" in result["msg"]
    assert "corrupt SRC" in result["skipped_files"][0]["reason"]
    assert "Traceback" not in result.get("module_stderr", "")


@needs_ansible
def test_module_bad_input_fails_cleanly(tmp_path):
    result = playbook(tmp_path, f"        src: {tmp_path}/nope\n        dst: {tmp_path}/dst\n")
    assert result["failed"] is True and "does not exist" in result["msg"]


def test_the_glue_has_no_second_implementation():
    text = (ROOT / "library" / "whisper_fill.py").read_text()
    assert "from carbonscale.whisper import" in text
    assert "struct" not in text and "numpy" not in text
