"""Print the README's results table from the committed metrics, so the numbers there cannot drift.

    python -m tools.results_table                 # print the markdown table
    python -m tools.results_table --write README.md   # replace the table between the README's markers
    python -m tools.results_table --check README.md   # exit 1 if the README's table differs (tests do this too)

It reads metrics/data.json, train_qformer.json, train_vlm.json and eval.json (what `dvc repro` writes) and prints
one markdown table. A row whose keys a run did not write (e.g. slot accuracy on data without regions, CIDEr
on data without captions) is left out, so the same command serves any dataset. A missing metrics file is an
error naming it and the stage that writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

START = "<!-- results:start -->"
END = "<!-- results:end -->"

# file name -> the stage that writes it (for the error message)
SOURCES = {
    "data.json": "data",
    "train_qformer.json": "train_qformer",
    "train_vlm.json": "train_vlm",
    "eval.json": "evaluate",
}


def load_metrics(metrics_dir: Path) -> dict[str, dict]:
    """Each metrics file by its stem ("eval", "data", ...). Raises FileNotFoundError naming a missing file."""
    out = {}
    for name, stage in SOURCES.items():
        path = metrics_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: `dvc repro {stage}` writes it")
        try:
            out[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): rerun `dvc repro {stage}`") from err
    return out


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _row(label: str, source: Mapping, keys: list[str], signed: bool = False) -> tuple[str, str] | None:
    """(label, "v1 / v2 / ...") if every key is there, else None."""
    if not all(k in source for k in keys):
        return None
    values = [source[k] for k in keys]
    text = [f"{v:+.3f}" if signed and isinstance(v, float) else _fmt(v) for v in values]
    return label, " / ".join(text)


def _question_types(ev: Mapping, prefix: str) -> list[str]:
    """The per-type VQA keys a run wrote (vqa_accuracy_color, ...), in name order."""
    known = {"vqa_accuracy_slots_right", "vqa_accuracy_slot_misnamed"}
    return sorted(k for k in ev if k.startswith(prefix) and k not in known)


def rows(metrics: Mapping[str, Mapping]) -> list[tuple[str, str]]:
    """The table's (metric, value) rows, in reading order."""
    ev, q1, vl, data = metrics["eval"], metrics["train_qformer"], metrics["train_vlm"], metrics["data"]
    types = _question_types(ev, "vqa_accuracy_")
    names = [t.removeprefix("vqa_accuracy_") for t in types]
    blind_types = [f"blind_{t}" for t in types]
    both = {f"stage1_{k}": v for k, v in q1.items()} | {f"stage2_{k}": v for k, v in vl.items()}
    candidates: list[Callable[[], tuple[str, str] | None]] = [
        lambda: _row("CIDEr", ev, ["cider"]),
        lambda: _row("BLEU-4 / METEOR / ROUGE-L", ev, ["bleu_4", "meteor", "rouge_l"]),
        lambda: _row("VQA accuracy", ev, ["vqa_accuracy"]),
        lambda: _row("VQA accuracy by type: " + " / ".join(names), ev, types) if types else None,
        lambda: _row("blind baseline (blank image): CIDEr / VQA accuracy", ev, ["blind_cider", "blind_vqa_accuracy"]),
        lambda: _row("blind VQA accuracy by type (same order)", ev, blind_types) if types else None,
        lambda: _row("visual gain (seeing - blind): CIDEr / VQA accuracy", ev,
                     ["visual_gain_cider", "visual_gain_vqa"], signed=True),
        lambda: _row("slots that name their target / images with every slot right", ev,
                     ["slot_accuracy", "slot_images_all_right"]),
        lambda: _row("VQA accuracy on images with every slot right / a slot misnamed", ev,
                     ["vqa_accuracy_slots_right", "vqa_accuracy_slot_misnamed"]),
        lambda: _row("Q-Former retrieval (ITC) R@1 image->text / text->image", q1, ["i2t_r1", "t2i_r1"]),
        lambda: _row("ITM re-ranked R@1 image->text / text->image", q1, ["i2t_r1_itm", "t2i_r1_itm"]),
        lambda: _row("Q-Former retrieval (ITC) R@5 image->text / text->image", q1, ["i2t_r5", "t2i_r5"]),
        lambda: _row("alignment: training slot accuracy at the end", vl, ["align_accuracy"]),
        lambda: _row("steps: stage 1 / stage 2", both, ["stage1_steps", "stage2_steps"]),
        lambda: _row("trainable parameters: projector / LoRA", vl, ["trainable_projector", "trainable_lora"]),
        lambda: _row("precision: stage 1 / stage 2", both, ["stage1_precision", "stage2_precision"]),
        lambda: _row("images: train / val / test", data, ["train_images", "val_images", "test_images"]),
        lambda: _row("test split: captions / questions", data, ["test_captions", "test_questions"]),
    ]
    return [r for make in candidates if (r := make()) is not None]


def render(metrics: Mapping[str, Mapping]) -> str:
    """The markdown table (no trailing newline)."""
    lines = ["| metric (test split unless named) | value |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in rows(metrics)]
    return "\n".join(lines)


def table_in(readme_text: str, readme: Path | str = "README.md") -> str:
    """The text between the results markers, stripped. Raises ValueError when the markers are missing."""
    if readme_text.count(START) != 1 or readme_text.count(END) != 1:
        raise ValueError(f"{readme} must hold {START} and {END} once each, around the results table")
    start = readme_text.index(START) + len(START)
    end = readme_text.index(END)
    if end < start:
        raise ValueError(f"{readme}: {END} comes before {START}")
    return readme_text[start:end].strip()


def replace_table(readme_text: str, table: str) -> str:
    table_in(readme_text)  # checks the markers
    start = readme_text.index(START) + len(START)
    end = readme_text.index(END)
    return readme_text[:start] + "\n" + table + "\n" + readme_text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="folder of the metrics files")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="README", help="replace the table between the markers")
    group.add_argument("--check", type=Path, metavar="README", help="exit 1 when the README's table differs")
    args = parser.parse_args(argv)
    try:
        table = render(load_metrics(args.metrics))
        if args.write:
            args.write.write_text(replace_table(args.write.read_text(), table))
        elif args.check:
            if table_in(args.check.read_text(), args.check) != table:
                print(f"{args.check}: the results table differs from {args.metrics}/*.json; "
                      f"run `python -m tools.results_table --write {args.check}`", file=sys.stderr)
                return 1
        else:
            print(table)
    except (FileNotFoundError, ValueError) as err:
        print(f"results_table: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
