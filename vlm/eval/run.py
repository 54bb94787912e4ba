"""Evaluate a trained VLM on a split: greedy captions scored with CIDEr & co, answers with VQA accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from vlm.config import EvalConfig
from vlm.data.embeddings import Embeddings, gather
from vlm.eval.scoring import score_captions, score_vqa
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import Task, with_embeddings


def predict(model: VisionLanguageModel, embeddings: Embeddings, tasks: Sequence[Task], config: EvalConfig,
            max_new_tokens: int, description: str) -> list[str]:
    """Generate one answer per task, in batches (left padding, KV cache)."""
    predictions: list[str] = []
    for start in tqdm(range(0, len(tasks), config.batch_size), desc=description, unit="batch"):
        chunk = tasks[start:start + config.batch_size]
        images = gather(embeddings, [t.image_id for t in chunk]).float()
        predictions += model.generate(images, [t.instruction for t in chunk], max_new_tokens,
                                      config.num_beams)
    return predictions


@torch.inference_mode()
def evaluate(model: VisionLanguageModel, embeddings: Embeddings, caption_tasks: list[Task], vqa_tasks: list[Task],
             config: EvalConfig) -> tuple[dict[str, float | str], list[dict]]:
    """(flat metrics, one prediction record per task)."""
    caption_tasks, vqa_tasks = with_embeddings(embeddings, caption_tasks), with_embeddings(embeddings, vqa_tasks)
    if config.max_images:
        keep = set(sorted({t.image_id for t in caption_tasks + vqa_tasks})[:config.max_images])
        caption_tasks = [t for t in caption_tasks if t.image_id in keep]
        vqa_tasks = [t for t in vqa_tasks if t.image_id in keep]
    metrics: dict[str, float | str] = {}
    records: list[dict] = []
    if caption_tasks:
        captions = predict(model, embeddings, caption_tasks, config, config.max_new_tokens, "captions")
        metrics.update(score_captions(captions, [list(t.answers) for t in caption_tasks]))
        records += [_record(t, p) for t, p in zip(caption_tasks, captions)]
    if vqa_tasks:
        answers = predict(model, embeddings, vqa_tasks, config, config.max_answer_tokens, "questions")
        metrics.update(score_vqa(answers, [list(t.answers) for t in vqa_tasks], [t.kind for t in vqa_tasks]))
        records += [_record(t, p) for t, p in zip(vqa_tasks, answers)]
    return metrics, records


def _record(task: Task, prediction: str) -> dict:
    return {"image_id": task.image_id, "type": task.kind, "instruction": task.instruction,
            "prediction": prediction, "references": list(task.answers)}
