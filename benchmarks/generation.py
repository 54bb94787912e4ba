"""4. Generation: tokens/s of the evaluation decoder, batched, ÷ the same prompts one at a time.

Both sides call `vlm.eval.run.predict` (what the `evaluate` stage calls: `VisionLanguageModel.generate`, greedy,
left padding, KV cache) on the captions and questions of the first `images` images of the workspace split,
with params.yaml's eval section; the per-sample side only sets eval.batch_size to 1. Tokens are those of the
decoded answers (re-tokenised), counted on each side's own output; the share of identical outputs is reported,
since batching with left padding may flip a near-tie. Goal ≥ 5.

Hooks on the LLM's forward split each side's time into prompt passes (prefill: the shared part, system +
visual tokens, once per image of the batch, then the questions after a copy of its KV cache) and decode steps
(one new token per row), which is where batching can and cannot help: a batch shares each decode step's weight
reads among its rows, and the questions about one image share one pass over its shared part, while batch 1 runs
that part again for every question.

The model is the trained one when `--vlm` names a `train_vlm` output, else a fresh one (Q-Former from BERT,
new projector, zero-initialised LoRA: the base LLM answering about random visual tokens), which runs to the
length limits more often than a trained model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.harness import Figure, ForwardClock, rate_ratio, ratio, side_by_side
from benchmarks.workspace import Workspace
from vlm.config import EvalConfig
from vlm.data.embeddings import gather
from vlm.eval.run import predict
from vlm.models.vlm import VisionLanguageModel
from vlm.data.tasks import load_tasks

GOAL = ">= 5"


def prompt_or_decode(args: tuple, kwargs: dict) -> str:
    """A generate forward with more than one new position is a prompt pass; one position, a decode step."""
    inputs = kwargs.get("inputs_embeds")
    inputs = kwargs.get("input_ids") if inputs is None else inputs
    return "prompt" if (inputs if inputs is not None else args[0]).shape[1] > 1 else "decode"


def load_model(ws: Workspace, vlm_dir: Path | None) -> VisionLanguageModel:
    params = ws.params
    if vlm_dir is not None:
        return VisionLanguageModel.load(vlm_dir, ws.models / "llm")
    torch.manual_seed(params.train_vlm.seed)
    return VisionLanguageModel.create(ws.qformer_dir, ws.models / "llm", params.projector.hidden_dim, params.lora,
                                      params.llm.system_prompt).eval()


def run(ws: Workspace, images: int, vlm_dir: Path | None = None, repeats: int = 1) -> Figure:
    params = ws.params
    model = load_model(ws, vlm_dir)
    embeddings = ws.embeddings
    caption_tasks, vqa_tasks = load_tasks(ws.dataset, params.llm)
    keep = set(embeddings.image_ids[:images])
    captions = [task for task in caption_tasks if task.image_id in keep]
    questions = [task for task in vqa_tasks if task.image_id in keep]
    outputs: dict[int, list[str]] = {}
    split: dict[int, tuple[float, float, int]] = {}  # batch size: (prompt-pass s, decode-step s, decode steps)
    clock = ForwardClock(model.llm.get_base_model(), prompt_or_decode)

    def decode(config: EvalConfig) -> None:
        clock.reset()
        outputs[config.batch_size] = (
            predict(model, embeddings, captions, config, config.max_new_tokens, "captions")
            + predict(model, embeddings, questions, config, config.max_answer_tokens, "questions"))
        split[config.batch_size] = (clock.seconds["prompt"], clock.seconds["decode"], clock.calls["decode"])

    batched, single = params.eval, replace(params.eval, batch_size=1)
    predict(model, embeddings, captions[:2], batched, 4, "warm-up")
    try:
        single_s, batched_s = side_by_side(lambda: decode(single), lambda: decode(batched), repeats)
    finally:
        clock.remove()
    single_prefill, single_decode, single_steps = split[single.batch_size]
    batched_prefill, batched_decode, batched_steps = split[batched.batch_size]

    def tokens(texts: list[str]) -> int:
        return sum(len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)

    single_out, batched_out = outputs[single.batch_size], outputs[batched.batch_size]
    single_tokens, batched_tokens = tokens(single_out), tokens(batched_out)
    image_ids = sorted({task.image_id for task in captions + questions})
    with torch.no_grad():  # each image's visual block: shorter where empty cells are left out
        device = next(model.projector.parameters()).device
        _, read = model.visual_block(gather(embeddings, image_ids).float().to(device))
    shared = {i: len(model.prompt.prefix_ids) + int(n) for i, n in zip(image_ids, read.sum(1))}  # + system turn
    prompt_tokens = sum(shared[task.image_id] + len(model.prompt.user_ids(task.instruction))
                        for task in captions + questions)
    same = sum(a == b for a, b in zip(single_out, batched_out)) / len(single_out)
    value = rate_ratio(batched_tokens, batched_s, single_tokens, single_s)
    return Figure(
        key="generation", title="4 generate tokens/s: batched / batch 1", value=value, goal=GOAL,
        details={"model": "trained" if vlm_dir is not None else "untrained", "prompts": len(single_out),
                 "captions": len(captions), "questions": len(questions), "batch_size": batched.batch_size,
                 "batched_s": batched_s, "single_s": single_s, "batched_tokens": batched_tokens,
                 "single_tokens": single_tokens, "batched_tokens_per_s": batched_tokens / batched_s,
                 "single_tokens_per_s": single_tokens / single_s, "identical_outputs": same,
                 "batched_prompt_s": batched_prefill, "batched_decode_s": batched_decode,
                 "single_prompt_s": single_prefill, "single_decode_s": single_decode,
                 "batched_decode_steps": batched_steps, "single_decode_steps": single_steps,
                 "prompt_tokens": prompt_tokens,
                 "prompt_speedup": ratio(single_prefill, batched_prefill),
                 "decode_speedup": ratio(single_decode, batched_decode)},
        note=f"{batched_tokens / batched_s:.0f} vs {single_tokens / single_s:.0f} tok/s ({len(captions)} captions + "
             f"{len(questions)} questions, batch {batched.batch_size}, {same:.0%} identical); decode steps "
             f"{ratio(single_decode, batched_decode):.1f}x, prompt passes {ratio(single_prefill, batched_prefill):.1f}x")
