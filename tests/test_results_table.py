"""The README's results table is what tools/results_table.py prints from the committed metrics/*.json."""

import json
import shutil
from pathlib import Path

import pytest

from tools import results_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_matches_committed_metrics():
    expected = results_table.render(results_table.load_metrics(ROOT / "metrics"))
    actual = results_table.table_in((ROOT / "README.md").read_text(), "README.md")
    assert actual == expected, (
        "README.md's results table differs from metrics/*.json: run `python -m tools.results_table --write README.md`")


def test_every_headline_metric_is_in_the_table():
    metrics = results_table.load_metrics(ROOT / "metrics")
    table = results_table.render(metrics)
    for value in (metrics["eval"]["cider"], metrics["eval"]["vqa_accuracy"], metrics["train_qformer"]["i2t_r1"]):
        assert f"{value:.3f}" in table


def _copy_metrics(tmp_path: Path) -> Path:
    folder = tmp_path / "metrics"
    folder.mkdir()
    for name in results_table.SOURCES:
        shutil.copy(ROOT / "metrics" / name, folder / name)
    return folder


def test_check_fails_when_a_metric_changes(tmp_path):
    folder = _copy_metrics(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    assert results_table.main(["--metrics", str(folder), "--check", str(readme)]) == 0
    ev = json.loads((folder / "eval.json").read_text())
    ev["vqa_accuracy"] = 0.5
    (folder / "eval.json").write_text(json.dumps(ev))
    assert results_table.main(["--metrics", str(folder), "--check", str(readme)]) == 1
    assert results_table.main(["--metrics", str(folder), "--write", str(readme)]) == 0
    assert "| VQA accuracy | 0.500 |" in readme.read_text()
    assert results_table.main(["--metrics", str(folder), "--check", str(readme)]) == 0


def test_rows_a_run_did_not_write_are_left_out(tmp_path):
    folder = _copy_metrics(tmp_path)
    ev = json.loads((folder / "eval.json").read_text())
    for key in [k for k in ev if k.startswith("slot") or "slot" in k or k in ("cider", "blind_cider")]:
        del ev[key]
    (folder / "eval.json").write_text(json.dumps(ev))
    table = results_table.render(results_table.load_metrics(folder))
    assert "slots that name their target" not in table and "slot misnamed" not in table
    assert "| CIDEr |" not in table
    assert "| VQA accuracy |" in table


def test_missing_file_and_markers_are_named(tmp_path):
    folder = _copy_metrics(tmp_path)
    (folder / "train_vlm.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_vlm\.json.*dvc repro train_vlm"):
        results_table.load_metrics(folder)
    with pytest.raises(ValueError, match="results:start"):
        results_table.table_in("no markers here", "README.md")
