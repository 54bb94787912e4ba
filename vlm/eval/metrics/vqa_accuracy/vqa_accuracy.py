"""VQA accuracy (the VQA v2 challenge metric) as a local `evaluate` module.

An answer counts as fully right when at least 3 of the 10 annotators gave it: accuracy is min(#matches/3, 1),
averaged over the 10 ways of leaving one annotator out so that every annotator is treated alike. Answers
are first normalised the official way, so "Two dogs." and "2 dogs" match.

Load it with `evaluate.load("<path to this folder>")`, or simply call `vlm.eval.scoring.score_vqa`.
"""

import re
from collections import defaultdict

import datasets
import evaluate

_DESCRIPTION = """\
VQA accuracy with the official answer normalisation. Several human answers: min(#humans that said the
prediction / 3, 1), averaged over the leave-one-out subsets of the humans. One human answer: exact match.
"""

_INPUTS = """\
Args:
    predictions: one generated answer per question.
    answers: the human answers of each question (1 to 10).
    question_types: optional, one type per question (e.g. "what color is the"); adds a per-type accuracy.
Returns:
    {"vqa_accuracy": mean over questions in [0, 1], "vqa_accuracy_<type>": ...}, where <type> is the
    question type lower-cased with every run of non-alphanumeric characters replaced by "_".
"""

_CITATION = """\
@inproceedings{antol2015vqa, title={VQA: Visual Question Answering},
  author={Antol, Stanislaw and others}, booktitle={ICCV}, year={2015}}
"""

# An answer counts as fully correct once this many humans gave it.
HUMANS_FOR_FULL_CREDIT = 3

# --- Official normalisation tables (restated from the VQA evaluation definition) ---------------------------
# Punctuation that is deleted (when it touches a space, or the answer has a digit-comma-digit like "1,000")
# or else replaced by a space ("hot-dog" -> "hot dog"). Apostrophes, colons and periods are not in it.
_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period is removed unless a digit follows it, so "3.5" survives but "dog." and "u.s." lose theirs.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The contractions the official table restores. Its keys are exactly these words with any ONE apostrophe
# missing ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've"), so we derive them below.
# Left out on purpose, to behave as the official script does: its capital-I entries ("Im", "Ive", "Id've"),
# which never fire because answers are lower-cased first, and its reversed entry "somebody'd" -> "somebodyd".
_CONTRACTIONS = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
    he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
    mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
    shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
    something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
    they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
    where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
    wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_RESTORE_APOSTROPHE = {
    word[:position] + word[position + 1 :]: word
    for word in _CONTRACTIONS
    for position, char in enumerate(word)
    if char == "'"
}


def _strip_punctuation(answer: str) -> str:
    deletes_all = _DIGIT_COMMA_DIGIT.search(answer) is not None
    result = answer
    for mark in _PUNCTUATION:
        # Decided on the original answer, one mark at a time, exactly like the official script.
        if deletes_all or f"{mark} " in answer or f" {mark}" in answer:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result)


def normalize_answer(answer: str) -> str:
    """Official VQA answer normalisation: punctuation, lower-case, number words, articles, contractions.

    >>> normalize_answer("The two dogs.")
    '2 dogs'
    """
    answer = _strip_punctuation(" ".join(answer.split()))
    words = [_NUMBER_WORDS.get(word, word) for word in answer.lower().split()]
    return " ".join(_RESTORE_APOSTROPHE.get(word, word) for word in words if word not in _ARTICLES)


def answer_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Accuracy of one prediction against the human answers to its question, all normalised here."""
    predicted = normalize_answer(prediction)
    humans = [normalize_answer(answer) for answer in human_answers]
    if len(humans) == 1:
        return float(predicted == humans[0])
    matches = sum(human == predicted for human in humans)
    # Leaving out human i removes their vote from the count only if they agreed with the prediction.
    per_left_out = [min((matches - (human == predicted)) / HUMANS_FOR_FULL_CREDIT, 1.0) for human in humans]
    return sum(per_left_out) / len(humans)


def _type_key(question_type: str, index: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", question_type.lower()).strip("_")
    if not slug:
        raise ValueError(
            f"vqa_accuracy: question_types[{index}]={question_type!r} has no letters or digits; "
            "give every question a real type or pass question_types=None."
        )
    return f"vqa_accuracy_{slug}"


class VqaAccuracy(evaluate.Metric):
    """Mean VQA accuracy over questions, optionally broken down by question type."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "answers": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(
        self,
        predictions: list[str],
        answers: list[list[str]],
        question_types: list[str] | None = None,
    ) -> dict[str, float]:
        if not predictions:
            raise ValueError("vqa_accuracy: predictions is empty; pass at least one answer.")
        for index, human_answers in enumerate(answers):
            if not human_answers:
                raise ValueError(
                    f"vqa_accuracy: answers[{index}] is empty; every question needs a human answer."
                )
        if question_types is not None and len(question_types) != len(predictions):
            raise ValueError(
                f"vqa_accuracy: {len(question_types)} question_types for {len(predictions)} predictions; "
                "give one type per question or pass question_types=None."
            )

        accuracies = [answer_accuracy(pred, humans) for pred, humans in zip(predictions, answers)]
        results = {"vqa_accuracy": sum(accuracies) / len(accuracies)}
        if question_types is not None:
            by_type: dict[str, list[float]] = defaultdict(list)
            for index, (question_type, accuracy) in enumerate(zip(question_types, accuracies)):
                by_type[_type_key(question_type, index)].append(accuracy)
            results.update({key: sum(values) / len(values) for key, values in sorted(by_type.items())})
        return results
