"""Tests for the caption and VQA metrics, called the way stages call them: through vlm.eval.scoring.

Caption tests that tokenise with the Java PTB tokenizer cost ~1 s each and skip METEOR (10-25 s of JVM
start-up); METEOR has its own test in test_metrics_meteor.py.
"""

import shutil

import pytest

from vlm.eval.scoring import score_captions, score_vqa

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")

# Four images about different things, so that CIDEr's IDF (taken from all references) is informative.
REFERENCES = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.", "Someone surfing."],
    ["Two dogs play with a red ball in the grass.", "Dogs chasing a ball on a lawn.", "Two puppies outside."],
    ["A plate of pasta with tomato sauce.", "Spaghetti and sauce on a white plate.", "A bowl of noodles."],
    ["A red double decker bus on a city street.", "A bus drives down the road.", "A London bus in traffic."],
]
CORRECT = [refs[0] for refs in REFERENCES]
# Each image gets the caption of the next image: fluent text, wrong content.
SWAPPED = CORRECT[1:] + CORRECT[:1]


def _hide_java(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *args, **kwargs: None if cmd == "java" else real_which(cmd))


# --- VQA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "human_answer"),
    [("Two", "2"), ("the dog.", "dog"), ("Yes!", "yes"), ("dont", "don't"), ("hot-dog", "hot dog"), ("1,000", "1000")],
)
def test_vqa_normalisation_makes_equivalent_answers_match(prediction: str, human_answer: str) -> None:
    assert score_vqa([prediction], [[human_answer]])["vqa_accuracy"] == 1.0


@pytest.mark.parametrize(("prediction", "human_answer"), [("3.5", "35"), ("two", "3"), ("dog", "dogs")])
def test_vqa_normalisation_keeps_different_answers_apart(prediction: str, human_answer: str) -> None:
    assert score_vqa([prediction], [[human_answer]])["vqa_accuracy"] == 0.0


# Hand computation for 10 humans of whom m agree with the prediction: leaving out one of the m agreeing
# humans leaves m-1 matches, leaving out one of the 10-m others leaves m; each counts min(matches/3, 1).
# m=1: (1*0 + 9*1/3)/10 = 0.3   m=2: (2*1/3 + 8*2/3)/10 = 0.6   m=3: (3*2/3 + 7*1)/10 = 0.9   m=4: 1.0
@pytest.mark.parametrize(("agreeing", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_accuracy_matches_hand_computation(agreeing: int, expected: float) -> None:
    humans = ["blue"] * agreeing + ["green"] * (10 - agreeing)
    assert score_vqa(["Blue."], [humans])["vqa_accuracy"] == pytest.approx(expected)


def test_vqa_reports_accuracy_per_question_type() -> None:
    result = score_vqa(
        predictions=["2", "3", "red"],
        answers=[["two"] * 10, ["4"] * 10, ["red"] * 10],
        question_types=["how many", "how many", "what color is the"],
    )
    assert result["vqa_accuracy"] == pytest.approx(2 / 3)
    assert result["vqa_accuracy_how_many"] == pytest.approx(0.5)
    assert result["vqa_accuracy_what_color_is_the"] == pytest.approx(1.0)
    assert len(result) == 3


def test_vqa_rejects_question_types_of_wrong_length() -> None:
    with pytest.raises(ValueError, match="question_types"):
        score_vqa(["yes", "no"], [["yes"], ["no"]], question_types=["yes/no"])


# --- Captions -----------------------------------------------------------------------------------------------


@requires_java
def test_correct_captions_beat_swapped_ones_and_bleu_stays_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    correct = score_captions(CORRECT, REFERENCES, include_meteor=False)
    swapped = score_captions(SWAPPED, REFERENCES, include_meteor=False)
    assert correct["tokenizer"] == "ptb"
    assert "meteor" not in correct
    for name in ("cider", "bleu_1", "bleu_4", "rouge_l"):
        assert correct[name] > swapped[name], name
    assert capsys.readouterr().out == ""  # pycocoevalcap's Bleu prints its counts unless silenced


@requires_java
def test_caption_that_equals_a_reference_gets_bleu_4_and_rouge_l_near_one() -> None:
    result = score_captions(CORRECT, REFERENCES, include_meteor=False)
    assert result["bleu_4"] == pytest.approx(1.0, abs=1e-3)
    assert result["rouge_l"] == pytest.approx(1.0)


@requires_java
def test_simple_tokenizer_scores_like_ptb_on_punctuated_captions() -> None:
    predictions = ["A dog's toy (red) isn't here, is it?", "Two \"happy\" kids -- eating 3.5 cakes... Yum!"]
    references = [["The dog's toys aren't red; they're blue."], ["Two kids eat cakes at 10:30 in the U.S."]]
    ptb = score_captions(predictions, references, tokenizer="ptb", include_meteor=False)
    with pytest.warns(UserWarning, match="tokenizer='simple'"):
        simple = score_captions(predictions, references, tokenizer="simple")
    assert simple["tokenizer"] == "simple"
    for name in ("cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert simple[name] == pytest.approx(ptb[name]), name


def test_without_java_captions_use_the_simple_tokenizer_warn_and_omit_meteor(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_java(monkeypatch)
    with pytest.warns(UserWarning, match="`java` is not on PATH"):
        result = score_captions(CORRECT, REFERENCES)
    assert result["tokenizer"] == "simple"
    assert "meteor" not in result
    assert result["bleu_4"] == pytest.approx(1.0, abs=1e-3)


def test_forcing_ptb_without_java_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_java(monkeypatch)
    with pytest.raises(RuntimeError, match="needs Java"):
        score_captions(CORRECT, REFERENCES, tokenizer="ptb")


@pytest.mark.parametrize(
    ("references", "tokenizer", "message"),
    [(REFERENCES, "nltk", "tokenizer='nltk'"), ([["a cat"], []] + REFERENCES[2:], "simple", r"references\[1\]")],
)
def test_caption_inputs_are_checked(references: list[list[str]], tokenizer: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_captions(CORRECT, references, tokenizer=tokenizer)
