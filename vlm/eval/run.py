"""Evaluate a trained VLM on a split: greedy captions scored with CIDEr & co, answers with VQA accuracy.

With a blank image's embedding, the same model is also scored blind: every image's visual tokens replaced by the
blank's, so the metrics show what it gets from the prompt and its priors alone, and `visual_gain_*` what it gets
from the image (seeing minus blind).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm import tqdm

from vlm.config import EvalConfig
from vlm.data.embeddings import Embeddings, gather
from vlm.eval.scoring import score_captions, score_vqa
from vlm.eval.slots import reads_grid_slots, slot_metrics, slots_right
from vlm.models.vlm import VisionLanguageModel
from vlm.data.tasks import Task, with_embeddings


def predict(model: VisionLanguageModel, embeddings: Embeddings, tasks: Sequence[Task], config: EvalConfig,
            max_new_tokens: int, description: str) -> list[str]:
    """Generate one answer per task, in batches (left padding, KV cache).

    Decoding is deterministic, so tasks with the same image and instruction are decoded once: blind, where every
    task has the same (blank) image, that is one caption and one answer per distinct question. Tasks come
    grouped by image, so the questions about one image mostly share a batch, and with it one pass over their
    shared prompt prefix (`VisionLanguageModel.generate`).
    """
    unique = list(dict.fromkeys((t.image_id, t.instruction) for t in tasks))
    answers: dict[tuple[str, str], str] = {}
    for start in tqdm(range(0, len(unique), config.batch_size), desc=description, unit="batch"):
        chunk = unique[start:start + config.batch_size]
        image_ids = list(dict.fromkeys(image_id for image_id, _ in chunk))
        position = {image_id: index for index, image_id in enumerate(image_ids)}
        generated = model.generate(gather(embeddings, image_ids).float(), [instruction for _, instruction in chunk],
                                   max_new_tokens, config.num_beams,
                                   image_index=[position[image_id] for image_id, _ in chunk])
        answers.update(zip(chunk, generated))
    return [answers[(t.image_id, t.instruction)] for t in tasks]


@torch.inference_mode()
def evaluate(model: VisionLanguageModel, embeddings: Embeddings, caption_tasks: list[Task], vqa_tasks: list[Task],
             config: EvalConfig, blank: Embeddings | None = None, regions: dict[str, list[dict]] | None = None
             ) -> tuple[dict[str, float | str], list[dict]]:
    """(flat metrics, one prediction record per task). With `blank` (one row: a blank image's embedding), the
    blind baseline too: `blind_cider`, `blind_vqa_accuracy[_<type>]`, `visual_gain_cider`, `visual_gain_vqa`.
    With the images' `regions` and a model whose slots name grid cells, how well they do (vlm/eval/slots.py)."""
    caption_tasks, vqa_tasks = with_embeddings(embeddings, caption_tasks), with_embeddings(embeddings, vqa_tasks)
    if config.max_images:
        keep = set(sorted({t.image_id for t in caption_tasks + vqa_tasks})[:config.max_images])
        caption_tasks = [t for t in caption_tasks if t.image_id in keep]
        vqa_tasks = [t for t in vqa_tasks if t.image_id in keep]
    metrics, records = _score(model, embeddings, caption_tasks, vqa_tasks, config)
    metrics["caption_images"] = len({t.image_id for t in caption_tasks})
    metrics["question_images"] = len({t.image_id for t in vqa_tasks})
    for tasks, names, lacking in ((caption_tasks, "CIDEr, BLEU, METEOR, ROUGE-L", "reference captions"),
                                  (vqa_tasks, "VQA accuracy", "questions")):
        if not tasks:
            print(f"evaluate: {names} not scored: no image of the split has {lacking}")
    evaluated = {t.image_id for t in caption_tasks + vqa_tasks}
    regions = {image_id: objects for image_id, objects in (regions or {}).items() if image_id in evaluated}
    if regions and reads_grid_slots(model):
        metrics.update(slot_metrics(slots_right(model, embeddings, regions), records))
    if blank is not None:
        metrics.update(_blind_baseline(model, blank, caption_tasks, vqa_tasks, config, metrics))
    return metrics, records


def _score(model: VisionLanguageModel, embeddings: Embeddings, caption_tasks: list[Task], vqa_tasks: list[Task],
           config: EvalConfig, label: str = "", caption_tokenizer: str = "auto", include_meteor: bool = True
           ) -> tuple[dict[str, float | str], list[dict]]:
    metrics: dict[str, float | str] = {}
    records: list[dict] = []
    if caption_tasks:
        captions = predict(model, embeddings, caption_tasks, config, config.max_new_tokens, f"{label}captions")
        metrics.update(score_captions(captions, [list(t.answers) for t in caption_tasks], caption_tokenizer,
                                      include_meteor))
        records += [_record(t, p) for t, p in zip(caption_tasks, captions)]
    if vqa_tasks:
        answers = predict(model, embeddings, vqa_tasks, config, config.max_answer_tokens, f"{label}questions")
        metrics.update(score_vqa(answers, [list(t.answers) for t in vqa_tasks], [t.kind for t in vqa_tasks]))
        records += [_record(t, p) for t, p in zip(vqa_tasks, answers)]
    return metrics, records


def _blind_baseline(model: VisionLanguageModel, blank: Embeddings, caption_tasks: list[Task], vqa_tasks: list[Task],
                    config: EvalConfig, seeing: dict[str, float | str]) -> dict[str, float]:
    """The same tasks with the blank image in place of each task's own; captions are tokenised for scoring as the
    seeing run's were, so CIDEr compares like with like (METEOR, which costs a Java start, is left out)."""
    if len(blank.image_ids) != 1:
        raise ValueError(f"the blank embedding must hold one image, got {len(blank.image_ids)}")
    blank_id = blank.image_ids[0]
    blind, _ = _score(model, blank, [replace(t, image_id=blank_id) for t in caption_tasks],
                      [replace(t, image_id=blank_id) for t in vqa_tasks], config, label="blind ",
                      caption_tokenizer=str(seeing.get("tokenizer", "auto")), include_meteor=False)
    baseline = {f"blind_{name}": float(value) for name, value in blind.items()
                if name == "cider" or name.startswith("vqa_accuracy")}
    if "cider" in blind:
        baseline["visual_gain_cider"] = float(seeing["cider"]) - float(blind["cider"])
    if "vqa_accuracy" in blind:
        baseline["visual_gain_vqa"] = float(seeing["vqa_accuracy"]) - float(blind["vqa_accuracy"])
    return baseline


def _record(task: Task, prediction: str) -> dict:
    return {"image_id": task.image_id, "type": task.kind, "instruction": task.instruction,
            "prediction": prediction, "references": list(task.answers)}
