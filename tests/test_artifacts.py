"""Writing stage outputs: whole or not at all, readable like any other file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from vlm.artifacts import write_json


def test_write_json_writes_a_whole_file_readable_by_all(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "embed.json"
    write_json(path, {"train_images": 3})
    assert json.loads(path.read_text()) == {"train_images": 3}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's owner-only 0o600
    assert [p.name for p in path.parent.iterdir()] == ["embed.json"]


def test_write_json_that_fails_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    write_json(path, {"cider": 1.0})
    with pytest.raises(TypeError):
        write_json(path, {"cider": object()})  # not JSON-serialisable, halfway through
    assert json.loads(path.read_text()) == {"cider": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
