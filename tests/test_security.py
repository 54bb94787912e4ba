"""Loading never executes code from files: safetensors or weights-only torch.load, and no remote model code."""

from __future__ import annotations

import re
from pathlib import Path

SOURCES = sorted(Path(__file__).resolve().parents[1].glob("[vs]*/**/*.py"))  # vlm/ and stages/


def test_the_scan_sees_the_library() -> None:
    names = {path.name for path in SOURCES}
    assert {"checkpoint.py", "vlm.py", "train_vlm.py"} <= names


def test_every_torch_load_is_weights_only() -> None:
    for path in SOURCES:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_no_remote_code_and_no_pickle() -> None:
    for path in SOURCES:
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"^\s*import pickle|pickle\.load", text, re.MULTILINE), path
