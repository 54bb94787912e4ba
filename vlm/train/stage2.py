"""Stage 2: teach the frozen LLM (through LoRA) to read the Q-Former's visual tokens.

Captions and VQA pairs train together. Every example is tokenised once, before training; a step only
gathers cached image embeddings and runs the model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm.config import LLMConfig, VLMTrainConfig
from vlm.data.dataset_io import read_split
from vlm.data.embeddings import Embeddings, gather
from vlm.models.prompt import ChatPrompt, Example
from vlm.models.vlm import VisionLanguageModel
from vlm.train.loop import train


@dataclass(frozen=True)
class Task:
    """One (image, instruction, reference answers) item, shared by training and evaluation."""

    image_id: str
    kind: str  # "caption" or the question type
    instruction: str
    answers: tuple[str, ...]


def question_instruction(question: str, llm: LLMConfig) -> str:
    return question + llm.question_suffix


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


def training_examples(tasks: list[Task], prompt: ChatPrompt, rng: random.Random) -> list[tuple[str, Example]]:
    """(image id, tokenised example); a caption task picks one of its references (a new one each epoch)."""
    return [(t.image_id, prompt.example(t.instruction, rng.choice(t.answers))) for t in tasks]


def example_batches(embeddings: Embeddings, caption_tasks: list[Task], vqa_tasks: list[Task], prompt: ChatPrompt,
                    batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, list[Example]]]:
    """Endless shuffled batches mixing caption and VQA examples; one epoch = every task once."""
    rng = random.Random(seed)
    while True:
        examples = training_examples(caption_tasks + vqa_tasks, prompt, rng)
        rng.shuffle(examples)
        for start in range(0, len(examples) - batch_size + 1, batch_size):
            chunk = examples[start:start + batch_size]
            images = gather(embeddings, [image_id for image_id, _ in chunk]).float()
            yield images, [example for _, example in chunk]


def train_vlm(model: VisionLanguageModel, embeddings: Embeddings, dataset_path: Path, llm: LLMConfig,
              config: VLMTrainConfig, log_dir: Path | None) -> dict[str, float]:
    torch.manual_seed(config.seed)
    caption_tasks, vqa_tasks = load_tasks(dataset_path, llm)
    total = len(caption_tasks) + len(vqa_tasks)
    batch_size = min(config.batch_size, total)
    steps = max(1, math.ceil(config.epochs * total / batch_size))
    batches = example_batches(embeddings, caption_tasks, vqa_tasks, model.prompt, batch_size, config.seed)
    model.train()
    groups = [
        {"params": list(model.projector.parameters()), "lr": config.projector_lr},
        {"params": [p for p in model.qformer.parameters() if p.requires_grad], "lr": config.qformer_lr},
        {"params": [p for p in model.llm.parameters() if p.requires_grad], "lr": config.lr},  # LoRA
    ]
    final = train(groups, lambda batch: {"loss": model(*batch)}, batches, steps, config, log_dir,
                  description="train_vlm")
    model.eval()
    return {"steps": steps, "examples_seen": steps * batch_size, "final_loss": round(final["loss"], 4)}
