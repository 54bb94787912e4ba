"""METEOR through vlm.eval.scoring. Kept apart from test_metrics.py because METEOR starts a Java process
that loads a paraphrase table: this single test takes 10-25 s.
"""

import shutil

import pytest

from vlm.eval.scoring import score_captions


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_is_near_one_when_each_caption_equals_one_of_its_references() -> None:
    references = [
        ["A man riding a wave on top of a surfboard.", "A surfer in the ocean."],
        ["Two dogs play with a red ball in the grass.", "Dogs chasing a ball."],
        ["A plate of pasta with tomato sauce.", "Spaghetti on a plate."],
    ]
    # Each prediction is its item's first reference; mixing items up would pull METEOR well below 1.
    result = score_captions([refs[0] for refs in references], references)
    assert result["tokenizer"] == "ptb"
    assert 0.95 < result["meteor"] <= 1.0
