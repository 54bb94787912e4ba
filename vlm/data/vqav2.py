"""VQAv2: a questions file (`v2_OpenEnded_mscoco_*_questions.json`) joined with its annotations file
(`v2_mscoco_*_annotations.json`) by question id, grouped per COCO image.

Every question keeps all ten human answers (repeats included), because VQA accuracy scores a prediction by how
many humans gave it. Its type is VQAv2's `answer_type` (yes/no, number, other): the breakdown VQA results are
reported in; the finer `question_type` ("what color is the", 65 of them) is not kept.
"""

from __future__ import annotations

from pathlib import Path

from vlm.data.dataset_io import DatasetError
from vlm.data.entry import Entry, Question, integer, read_json, require, text
from vlm.data.image_files import ImageFolder


def read_questions(questions_path: Path, annotations_path: Path) -> dict[int, list[Question]]:
    """{COCO image id: its questions}, images and questions in the questions file's order.

    Raises DatasetError naming the file and record when a question has no annotation, the two files disagree
    on its image, or a field is missing or ill-typed.
    """
    questions = _list_field(questions_path, "questions")
    annotations: dict[int, tuple[dict, str]] = {}
    for index, annotation in enumerate(_list_field(annotations_path, "annotations")):
        where = f"{annotations_path}: annotations[{index}]"
        annotations[integer(require(annotation, "question_id", where), where, "question_id")] = (annotation, where)

    by_image: dict[int, list[Question]] = {}
    for index, record in enumerate(questions):
        where = f"{questions_path}: questions[{index}]"
        question_id = integer(require(record, "question_id", where), where, "question_id")
        where = f"{where} (question_id {question_id})"
        image_id = integer(require(record, "image_id", where), where, "image_id")
        if question_id not in annotations:
            raise DatasetError(f"{where}: has no annotation in {annotations_path}; are the two files of the same "
                               "VQAv2 split?")
        annotation, annotation_where = annotations[question_id]
        if require(annotation, "image_id", annotation_where) != image_id:
            raise DatasetError(f"{where}: image_id {image_id}, but {annotation_where} says "
                               f"{annotation['image_id']!r}")
        by_image.setdefault(image_id, []).append(Question(
            question=text(require(record, "question", where), where, "question", empty_ok=False),
            answers=_answers(annotation, annotation_where),
            type=text(require(annotation, "answer_type", annotation_where), annotation_where, "answer_type",
                      empty_ok=False),
        ))
    return by_image


def vqa_entries(questions_path: Path, by_image: dict[int, list[Question]], folder: ImageFolder) -> list[Entry]:
    """One Entry per image of `by_image` (from `questions_path`), its file looked up by COCO id in `folder`."""
    return [Entry(str(image_id), f"{questions_path}: image_id {image_id}", folder, (), image_id, [], list(questions))
            for image_id, questions in by_image.items()]


def _answers(annotation: dict, where: str) -> tuple[str, ...]:
    answers = require(annotation, "answers", where)
    if not isinstance(answers, list):
        raise DatasetError(f"{where}: 'answers' must be a list, got {type(answers).__name__}")
    texts = [text(require(answer, "answer", f"{where} answers[{i}]"), where, f"answers[{i}].answer")
             for i, answer in enumerate(answers)]
    texts = [answer for answer in texts if answer]
    if not texts:  # no usable human answer: fall back on the consensus answer, if there is one
        texts = [text(require(annotation, "multiple_choice_answer", where), where, "multiple_choice_answer",
                      empty_ok=False)]
    return tuple(texts)


def _list_field(path: Path, key: str) -> list:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DatasetError(f"{path}: not a VQAv2 {key} file: expected an object with a {key!r} list")
    return data[key]
