"""Do the params fit the data? Checked in seconds, before any image is embedded.

What each split holds is summed up from its text alone (`summarize`: how many images have captions, questions,
regions), and every param that needs something of the data is held against it (`check_params`). A problem names
the param, what the data lacks and the fix. The `check` stage runs this between `data` and `embed`, so a recipe
that cannot work on the data stops before the expensive steps; `vlm check` runs it by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlm.config import RECALL_KS, Params
from vlm.data.dataset_io import read_split

TEXT_COLUMNS = ("captions", "questions", "regions", "conversations")


@dataclass(frozen=True)
class SplitSummary:
    """How many images of a split hold each kind of text."""

    images: int
    with_captions: int
    with_questions: int
    with_regions: int
    with_conversations: int = 0
    conversations_without_captions: int = 0  # their first replies stand in for captions (dataset_io)

    @property
    def with_caption_texts(self) -> int:
        """Images with captions, or with conversations whose first replies stand in for them: what stage 1 and
        the caption alignment read."""
        return self.with_captions + self.conversations_without_captions

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    param: str  # the param whose value does not fit
    problem: str  # what the data lacks
    fix: str
    fatal: bool = True  # False: a warning (the run goes on, with what it says)

    def __str__(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: param {self.param}: {self.problem}. Fix: {self.fix}"


class DataMismatch(ValueError):
    """Params that cannot work on the data; the message lists every problem with its fix."""


def summarize(rows: Iterable[Mapping[str, Any]]) -> SplitSummary:
    """A split's summary from rows holding (at least) captions, questions and regions lists."""
    images = captions = questions = regions = conversations = conversations_only = 0
    for row in rows:
        images += 1
        captions += bool(row.get("captions"))
        questions += bool(row.get("questions"))
        regions += bool(row.get("regions"))
        conversations += bool(row.get("conversations"))
        conversations_only += bool(row.get("conversations") and not row.get("captions"))
    return SplitSummary(images, captions, questions, regions, conversations, conversations_only)


def summarize_split(path: Path) -> SplitSummary:
    """The summary of a dataset split file (text columns only, no image bytes)."""
    return summarize(read_split(path, columns=list(TEXT_COLUMNS)).to_pylist())


def check_params(params: Params, splits: Mapping[str, SplitSummary]) -> list[Problem]:
    """Every mismatch between `params` and the data summed up in `splits` ({"train": ..., "test": ...})."""
    train, test = splits["train"], splits["test"]
    problems: list[Problem] = []
    stage1, align, grid = params.train_qformer, params.train_vlm.align, params.train_vlm.grid

    def count(summary: SplitSummary, kind: str) -> int:
        return summary.with_caption_texts if kind == "captions" else summary.with_questions

    # stage 1: image-text pairs
    if count(train, stage1.texts) == 0:
        other = "questions" if stage1.texts == "captions" else "captions"
        fix = (f"set train_qformer.texts: {other}" if count(train, other) else "give the train images captions or "
               "questions")
        if stage1.texts == "captions" and count(train, other):
            fix += " (stage 1 on each image's questions and answers), or apply the question-only recipe: " \
                   "`vlm recipe question-only`"
        problems.append(Problem("train_qformer.texts", f"stage 1 pairs images with their {stage1.texts}, and none "
                                f"of the {train.images} train images has any", fix))
    elif count(train, stage1.texts) < train.images:
        missing = train.images - count(train, stage1.texts)
        problems.append(Problem("train_qformer.texts", f"{missing} of {train.images} train images have no "
                                f"{stage1.texts}; stage 1 trains on the other {train.images - missing} and counts "
                                "these in metrics/train_qformer.json", "none needed", fatal=False))
    usable = count(train, stage1.texts)
    if 0 < usable < stage1.batch_size:
        problems.append(Problem("train_qformer.batch_size", f"only {usable} train images have {stage1.texts}, fewer "
                                f"than a batch of {stage1.batch_size}", f"stage 1 uses batches of {usable}",
                                fatal=False))

    # the alignment before stage 2
    if align.steps and align.target == "grid":
        if train.with_regions == 0:
            problems.append(Problem(
                "train_vlm.align.target", "target grid needs regions (objects with a place and a phrase) on the "
                f"train images, and none of the {train.images} has any", "apply the own-data recipe "
                "(`vlm recipe own-data`: BLIP-2's plain queries, the alignment spells captions), or give the images "
                "regions (JSONL `regions`, COCO `data.coco.instances`)"))
        elif train.with_regions < train.images:
            problems.append(Problem("train_vlm.align.target", f"{train.images - train.with_regions} of "
                                    f"{train.images} train images have no regions", "none needed: the grid "
                                    "alignment trains on the others", fatal=False))
        needed = grid.size * grid.size
        if grid.size and params.qformer.num_queries < needed:
            problems.append(Problem("qformer.num_queries", f"a {grid.size} x {grid.size} grid needs one query per "
                                    f"cell ({needed}), there are {params.qformer.num_queries}",
                                    f"raise qformer.num_queries to {needed} or more, or lower train_vlm.grid.size"))
    if align.steps and align.target == "caption" and train.with_caption_texts == 0:
        problems.append(Problem("train_vlm.align.target", f"the alignment spells reference captions, and none of "
                                f"the {train.images} train images has one", "set train_vlm.align.target: answers "
                                "(it spells the answers to the image's questions), or apply the question-only "
                                "recipe: `vlm recipe question-only`"))
    if align.steps and align.target == "answers" and train.with_questions == 0:
        problems.append(Problem("train_vlm.align.target", f"target answers spells the answers to an image's "
                                f"questions, and none of the {train.images} train images has any",
                                "set train_vlm.align.target: caption"))

    # stage 2 and evaluation
    if train.with_captions == 0 and train.with_questions == 0 and train.with_conversations == 0:
        problems.append(Problem("data", "stage 2 trains on captions, questions and conversations, and the train "
                                "split has none", "give the train images captions, questions or conversations"))
    if test.with_captions == 0 and test.with_questions == 0:
        problems.append(Problem("data", "the test split has neither captions nor questions: evaluate would have "
                                "nothing to score", "give the test images captions or questions (reference "
                                "answers)", fatal=test.with_conversations == 0))
    else:
        for kind, metric in (("captions", "CIDEr, BLEU, METEOR, ROUGE-L"), ("questions", "VQA accuracy")):
            if count(test, kind) == 0:
                problems.append(Problem("data", f"the test split has no {kind}", f"none needed: {metric} "
                                        "will not be reported", fatal=False))
    largest_k = max(RECALL_KS)
    scored = count(test, stage1.texts)
    if 0 < scored <= largest_k:
        problems.append(Problem("data", f"retrieval recall@{largest_k} needs more than {largest_k} test images with "
                                f"{stage1.texts}, the test split has {scored}", "more test images (or read "
                                f"recall@k only for k < {scored})", fatal=False))
    return problems


def raise_on_fatal(problems: list[Problem]) -> None:
    """Print the warnings; raise DataMismatch listing every fatal problem."""
    for problem in problems:
        if not problem.fatal:
            print(problem)
    fatal = [str(problem) for problem in problems if problem.fatal]
    if fatal:
        raise DataMismatch("the params do not fit the data:\n  " + "\n  ".join(fatal))


def summary_metrics(splits: Mapping[str, SplitSummary]) -> dict[str, int]:
    """Flat `{split}_{count}` numbers for metrics/check.json."""
    return {f"{split}_{key}": value for split, summary in splits.items() for key, value in summary.to_dict().items()}
