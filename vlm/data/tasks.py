"""What a split asks of a model, as training and evaluation both read it: caption tasks (one per image, all its
reference captions), question tasks (one per question, all its reference answers) and conversations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vlm.config import LLMConfig
from vlm.data.dataset_io import read_split
from vlm.data.embeddings import Embeddings, available


def question_instruction(question: str, llm: LLMConfig) -> str:
    """The user turn that asks `question` (training, evaluation and `ask` word it the same way)."""
    return question + llm.question_suffix


@dataclass(frozen=True)
class Task:
    """One (image, instruction, reference answers) item, shared by training and evaluation."""

    image_id: str
    kind: str  # "caption" or the question type
    instruction: str
    answers: tuple[str, ...]


def load_tasks(dataset_path: Path, llm: LLMConfig) -> tuple[list[Task], list[Task]]:
    """(caption tasks, one per image with all references; VQA tasks, one per question) of a split."""
    table = read_split(dataset_path, columns=["image_id", "captions", "questions", "answers", "question_types"])
    captions, questions = [], []
    for row in table.to_pylist():
        if row["captions"]:
            captions.append(Task(row["image_id"], "caption", llm.caption_prompt, tuple(row["captions"])))
        for question, answers, kind in zip(row["questions"], row["answers"], row["question_types"]):
            questions.append(Task(row["image_id"], kind, question_instruction(question, llm), tuple(answers)))
    return captions, questions


@dataclass(frozen=True)
class ConversationTask:
    """A multi-turn conversation about one image: (user, assistant) turns in order (the dataset's `conversations`)."""

    image_id: str
    turns: tuple[tuple[str, str], ...]

    @property
    def replies(self) -> int:
        return len(self.turns)


def load_conversations(dataset_path: Path) -> list[ConversationTask]:
    """Every conversation of a split, image by image, in order."""
    table = read_split(dataset_path, columns=["image_id", "conversations"])
    return [ConversationTask(row["image_id"], tuple((turn["user"], turn["assistant"]) for turn in conversation))
            for row in table.to_pylist() for conversation in row["conversations"]]


ImageItem = TypeVar("ImageItem", Task, ConversationTask)


def with_embeddings(embeddings: Embeddings, tasks: Sequence[ImageItem]) -> list[ImageItem]:
    """The tasks (or conversations) whose image has an embedding (`embed` leaves out images it skipped as
    unreadable)."""
    keep = set(available(embeddings, {task.image_id: None for task in tasks}))
    return [task for task in tasks if task.image_id in keep]
