"""params.yaml comments and the docstrings and comments in vlm/ and stages/ say what a thing does and why, not
what a run scored: run numbers go stale (the experiment log in docs/experiments/ keeps them, with the commit).

A "metric quote" is a metric's name next to a decimal number ("VQA 0.829", "CIDEr 1.93 -> 2.59", "R@1 0.908",
"accuracy 0.50"), a number before one ("0.873 VQA"), a change between two decimals ("0.36 -> 0.41") or a
"measured ... ->" note. Constants, shapes and rates ("sigma 0.25", "lr 1e-4", "384 -> 768", "VQA accuracy 1")
are not.
"""

import ast
import io
import re
import tokenize
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

_METRIC = r"(?:VQA|CIDEr(?:-D)?|BLEU(?:-\d)?|METEOR|ROUGE(?:-L)?|R@\d+|recall@\d+|accuracy|accuracies)"
_DECIMAL = r"\d*\.\d+"
_ARROW = r"(?:->|→|=>)"
PATTERNS = [
    # metric, then within a few words (no sentence end) a decimal: "VQA 0.739", "accuracy ended at 0.50"
    re.compile(rf"\b{_METRIC}(?![\w@])[^.;\n]{{0,25}}?(?<![\w.]){_DECIMAL}\b", re.IGNORECASE),
    # a decimal, then the metric: "0.873 VQA", "0.97 accuracy"
    re.compile(rf"(?<![\w.]){_DECIMAL}\s*(?:\w+\s+)?{_METRIC}\b", re.IGNORECASE),
    # a before -> after between decimals: "0.36 -> 0.41", "1.93 → 2.59"
    re.compile(rf"(?<![\w.]){_DECIMAL}\s*{_ARROW}\s*{_DECIMAL}\b"),
    # "measured: 32 -> 128, ..." and the like
    re.compile(rf"\bmeasured\b[^\n]{{0,80}}?{_ARROW}", re.IGNORECASE),
]


def metric_quotes(text: str) -> list[str]:
    """The metric quotes in one comment or docstring (whitespace runs joined, so a quote may span lines)."""
    flat = " ".join(text.split())
    return [m.group(0) for pattern in PATTERNS for m in pattern.finditer(flat)]


def _yaml_comments(path: Path) -> list[tuple[int, str]]:
    """(line, comment) for each `#` comment of a YAML file (a `#` inside quotes is not one)."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        quote = None
        for i, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
                out.append((number, line[i + 1:]))
                break
    return out


def _python_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) for every comment and docstring of a Python file; consecutive comment lines form one text."""
    source = path.read_text()
    out: list[tuple[int, str]] = []
    block: list[str] = []
    start = last = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if block and tok.start[0] != last + 1:
                out.append((start, " ".join(block)))
                block = []
            if not block:
                start = tok.start[0]
            block.append(tok.string.lstrip("#"))
            last = tok.start[0]
    if block:
        out.append((start, " ".join(block)))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return out


def _offenders() -> list[str]:
    found = []
    for number, comment in _yaml_comments(ROOT / "params.yaml"):
        found += [f"params.yaml:{number}: {q!r}" for q in metric_quotes(comment)]
    for folder in ("vlm", "stages"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "metrics" in path.relative_to(ROOT).parts[1:-1]:
                continue  # vendored metric scripts (vlm/eval/metrics/*/*.py) are not ours to reword
            for number, text in _python_texts(path):
                rel = path.relative_to(ROOT)
                found += [f"{rel}:{number}: {q!r}" for q in metric_quotes(text)]
    return found


def test_no_metric_quotes_in_params_comments_or_docstrings():
    offenders = _offenders()
    assert not offenders, (
        "run numbers in comments/docstrings (move them to docs/experiments/ and link the file):\n  "
        + "\n  ".join(offenders))


def test_params_yaml_comments_parse_as_comments():
    # the comment reader must see the file's comments and nothing else: params.yaml still parses, and it has some
    comments = _yaml_comments(ROOT / "params.yaml")
    assert len(comments) > 20
    assert yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_patterns_catch_metric_quotes():
    for text in [
        "measured: VQA 0.739 -> 0.829 in 63 steps",
        "raising LoRA's helps (VQA 0.739 at 5e-4, 0.808 at 2e-3)",
        "align.py quotes CIDEr 1.93 → 2.59",
        "test t2i R@1: ITC alone 0.908",
        "slot accuracy ended near 0.12",
        "frozen (0.36 -> 0.41 and 1.10)",
        "the default run scored 0.873 VQA",
        "Measured: 32 -> 128, same outputs",
        "BLEU-4 0.549",
    ]:
        assert metric_quotes(text), text


def test_the_patterns_leave_constants_and_shapes_alone():
    for text in [
        "sigma 0.25 of a cell; lr 1e-4 for the Q-Former",
        "tokens concatenated: 384 -> 768 wide",
        "an answer with VQA accuracy 1 is drawn green, 0 red",
        "[num_tokens, hidden_size] as fp16; (B, 32, 768) -> (B, 32, 576)",
        "retrieval R@1, R@5 and R@10 on the test split",
        "the CIDEr scorer of pycocoevalcap, version 1.2",
        "eps 1e-6 keeps the accuracy computation finite",
        "top-p 0.9 sampling, temperature 0.7",
    ]:
        assert not metric_quotes(text), (text, metric_quotes(text))
