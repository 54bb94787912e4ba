"""Replies to several conversations decoded in one batch, streamed as text deltas per request.

Each request brings its prompt (`ChatPrompt.conversation`) and its `Sampling`; one decode batch
(`VisionLanguageModel.decode_steps`: the shared part of each prompt cached, left padding, rows leaving as they end)
serves them all, each row picking tokens its own way (`Sampler`) and turning them into text its own way
(`TextStream`: stop strings, multi-byte characters).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from vlm.models.prompt import Example
from vlm.models.sampling import Sampler, Sampling
from vlm.models.text_stream import Delta, TextStream
from vlm.models.vlm import VisionLanguageModel


def stream_replies(model: VisionLanguageModel, image_embeds: torch.Tensor,
                   prompts: Sequence[tuple[Sequence[int], Example]], samplings: Sequence[Sampling],
                   seen: Sequence[bool] | None = None) -> Iterator[list[Delta | None]]:
    """One list per decoding step, one entry per request: its `Delta` (new text; on its last step the finish
    reason), or None once the request finished at an earlier step. Request i is `prompts[i]` about image i of
    `image_embeds` [B, T, D] (no image where `seen[i]` is False) decoded with `samplings[i]`. The token limit is
    each request's `max_tokens`; fitting it into the LLM's context is the caller's business."""
    if not len(prompts) == len(samplings) == len(image_embeds):
        raise ValueError(f"{len(prompts)} prompts, {len(samplings)} samplings and {len(image_embeds)} images: "
                         "give one of each per request")
    streams = [TextStream(model.tokenizer, sampling.stop) for sampling in samplings]
    counts = [0] * len(prompts)
    device = next(model.projector.parameters()).device
    stop = torch.zeros(len(prompts), dtype=torch.bool)
    steps = model.decode_steps(image_embeds, prompts, [s.max_tokens for s in samplings], Sampler(samplings, device),
                               stop, seen)
    done = [False] * len(prompts)
    end_of_turn = model.prompt.end_of_turn_id
    for rows, tokens in steps:
        deltas: list[Delta | None] = [None] * len(prompts)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            stream = streams[row]
            counts[row] += 1
            if token == end_of_turn:
                deltas[row] = Delta(stream.finish(), "stop")
            else:
                text = stream.push(token)
                if stream.stopped:
                    stop[row] = True
                    deltas[row] = Delta(text, "stop")
                elif counts[row] == samplings[row].max_tokens:
                    deltas[row] = Delta(text + stream.finish(), "length")
                else:
                    deltas[row] = Delta(text)
            done[row] = deltas[row].finish_reason is not None
        yield deltas
        if all(done):
            return
