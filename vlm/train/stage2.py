"""Stage 2: teach the frozen LLM (through LoRA) to read the Q-Former's visual tokens.

Captions, VQA pairs and multi-turn conversations train together, packed: one row per image holds all of its
segments, each of which sees only the shared system prompt and visual tokens and itself (`vlm/models/packing.py`).
A caption or a question is a one-turn segment; a conversation is one segment, its turns in order, so that each
reply is trained with the conversation's earlier turns in context (`ChatPrompt.conversation`). Only the replies
and their end-of-turn tokens are targets. Every segment is tokenised once per epoch (a conversation once per
run); a step only gathers cached image embeddings and runs the model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from vlm import distributed
from vlm.config import LLMConfig, VLMTrainConfig
from vlm.data.embeddings import Embeddings, gather
from vlm.data.tasks import ConversationTask, Task, load_conversations, load_tasks, with_embeddings
from vlm.models.prompt import ChatPrompt, Example
from vlm.models.vlm import VisionLanguageModel
from vlm.precision import bf16_on_cpu, effective_precision
from vlm.train.bf16_llm import frozen_llm_in_bf16
from vlm.train.checkpoint import Checkpointer
from vlm.train.loop import train


def image_conversations(tasks: list[Task], prompt: ChatPrompt, rng: random.Random,
                        conversations: Sequence[tuple[str, Example]] = ()) -> list[tuple[str, list[Example]]]:
    """(image id, all of its segments): one packed training row per image, segments in a fresh random order.

    A caption task contributes one of its references, a new random one each epoch; a question its answer; a
    conversation (image id, its tokenised Example: `ChatPrompt.conversation`) all of its turns, as one segment.
    """
    turns: dict[str, list[Example]] = {}
    for task in tasks:
        turns.setdefault(task.image_id, []).append(prompt.example(task.instruction, rng.choice(task.answers)))
    for image_id, example in conversations:
        turns.setdefault(image_id, []).append(example)
    for examples in turns.values():
        rng.shuffle(examples)
    return list(turns.items())


# Batches are cut from pools of this many batches' worth of shuffled rows, sorted by length: a row is padded to
# the longest in its batch, and random batches of 8 default rows were 11.6% padding, pooled ones 1.1%.
POOL_BATCHES = 16


def tokenised(conversations: Sequence[ConversationTask], prompt: ChatPrompt) -> list[tuple[str, Example]]:
    """(image id, Example) of each conversation: its tokens are the same every epoch, so they are made once."""
    return [(conversation.image_id, prompt.conversation(conversation.turns)[1]) for conversation in conversations]


def conversation_batches(embeddings: Embeddings, tasks: list[Task], prompt: ChatPrompt, batch_size: int,
                         seed: int, conversations: Sequence[tuple[str, Example]] = ()
                         ) -> Iterator[tuple[torch.Tensor, list[list[Example]]]]:
    """Endless shuffled batches of `batch_size` images, each with all its caption and VQA turns and its
    conversations (`tokenised`); the images of a batch have about as many turn tokens (`POOL_BATCHES`), and the
    batches come in random order."""
    rng = random.Random(seed)
    while True:
        rows = image_conversations(tasks, prompt, rng, conversations)
        rng.shuffle(rows)
        chunks = []
        pool_size = batch_size * POOL_BATCHES
        for pool_start in range(0, len(rows), pool_size):
            pool = sorted(rows[pool_start:pool_start + pool_size], key=lambda row: sum(turn.num_tokens for turn in row[1]))
            chunks += [pool[start:start + batch_size] for start in range(0, len(pool) - batch_size + 1, batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            images = gather(embeddings, [image_id for image_id, _ in chunk]).float()
            yield images, [turns for _, turns in chunk]


def train_vlm(model: VisionLanguageModel, embeddings: Embeddings, dataset_path: Path, llm: LLMConfig,
              config: VLMTrainConfig, log_dir: Path | None, checkpoint_dir: Path | None = None,
              fingerprint: dict | None = None) -> dict[str, float]:
    """Train the model's projector, Q-Former image path and LoRA. Under torchrun each rank takes its share of
    every global batch; with `checkpoint_dir`, a killed run resumes where it stopped (`fingerprint` names what
    else shaped the run, e.g. the model's params)."""
    torch.manual_seed(config.seed)
    caption_tasks, vqa_tasks = load_tasks(dataset_path, llm)
    tasks = with_embeddings(embeddings, caption_tasks + vqa_tasks)
    conversations = with_embeddings(embeddings, load_conversations(dataset_path))
    images = len({task.image_id for task in tasks} | {conversation.image_id for conversation in conversations})
    if not images:
        raise ValueError(f"train_vlm: no training image of {dataset_path} has both an embedding and a caption, "
                         "question or conversation to learn from")
    batch_size = min(config.batch_size, images)
    steps = max(1, math.ceil(config.epochs * images / batch_size))
    dialogues = tokenised(conversations, model.prompt)
    model.check_context(example for _, example in dialogues)  # now, not at the step that meets a long one
    batches = conversation_batches(embeddings, tasks, model.prompt, batch_size, config.seed, dialogues)
    model.to(distributed.device()).train()
    if config.qformer_lr == 0:
        # Frozen Q-Former (the default): with a short stage 2, training it let the LLM's loss wash the image out of
        # its queries (docs/experiments/qformer-frozen-in-stage2.md).
        # Frozen means eval mode too (as BLIP-2 does with its frozen ViT): its dropout would feed the LLM noisier
        # visual tokens in training than it ever sees in evaluation, and cost time.
        model.qformer.requires_grad_(False).eval()
    groups = [
        {"params": list(model.projector.parameters()), "lr": config.projector_lr},
        {"params": [p for p in model.qformer.parameters() if p.requires_grad], "lr": config.qformer_lr},
        {"params": [p for p in model.llm.parameters() if p.requires_grad], "lr": config.lr},  # LoRA
    ]
    groups = [group for group in groups if group["params"]]
    local = distributed.local_slice(batch_size)

    def step_losses(batch):
        images, rows = batch
        return {"loss": model(images[local], rows[local], average=config.loss_average)}

    checkpointer = None
    if checkpoint_dir is not None:
        run = {"stage": "train_vlm", "llm": asdict(llm), "train": asdict(config), "steps": steps,
               **(fingerprint or {})}
        checkpointer = Checkpointer(checkpoint_dir, config.checkpoint_every, model, run)
    in_bf16 = frozen_llm_in_bf16(model, eager_attention=bf16_on_cpu(config.precision)) \
        if effective_precision(config.precision) == "bf16" else nullcontext()
    with in_bf16:  # the frozen LLM as autocast would cast it, held so instead of cast anew at every step
        final = train(groups, step_losses, batches, steps, config, log_dir, description="train_vlm",
                      checkpointer=checkpointer)
    model.eval()
    # a turn: a caption, a question, or one exchange of a conversation (each is one supervised reply)
    turns_per_image = (len(tasks) + sum(conversation.replies for conversation in conversations)) / images
    return {"steps": steps, "images_seen": steps * batch_size,
            "turns_seen": round(steps * batch_size * turns_per_image), "final_loss": round(final["loss"], 4)}
