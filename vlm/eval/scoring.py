"""One-call scoring for captions and VQA answers, so callers need not know where the metric modules live.

The metrics are local `evaluate` modules in `vlm/eval/metrics/` (loaded by path: offline, no Hub). Each is
loaded once per process and kept in memory; `evaluate` writes no cache files for them.
"""

from functools import cache
from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent / "metrics"


@cache
def _load_metric(name: str) -> evaluate.EvaluationModule:
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def score_captions(
    predictions: list[str],
    references: list[list[str]],
    tokenizer: str = "auto",
    include_meteor: bool = True,
) -> dict[str, float | str]:
    """CIDEr-D, BLEU-1..4, METEOR and ROUGE-L of a whole split (see caption_metrics.py).

    tokenizer: "auto" (Java PTB if available, else the pure-Python imitation), "ptb" or "simple".
    include_meteor=False skips METEOR, which spends 10-25 s starting Java.
    Returns flat floats plus "tokenizer": "ptb" | "simple"; "meteor" is absent when it was not computed.
    """
    return _load_metric("caption_metrics").compute(
        predictions=predictions, references=references, tokenizer=tokenizer, include_meteor=include_meteor
    )


def score_vqa(
    predictions: list[str],
    answers: list[list[str]],
    question_types: list[str] | None = None,
) -> dict[str, float]:
    """Official VQA accuracy in [0, 1] ("vqa_accuracy"), plus "vqa_accuracy_<type>" when types are given."""
    return _load_metric("vqa_accuracy").compute(
        predictions=predictions, answers=answers, question_types=question_types
    )
