"""The decoding loop, in which a finished row stops costing compute: greedy, or any other way to pick tokens.

`transformers`' `generate` keeps every row of a batch in each forward pass until the last row ends; finished
rows decode padding. Captions differ in length (on the default test split about 25 tokens, up to 48 allowed),
so here a row leaves the batch, and its KV cache, at the step it emits end-of-turn (or reaches its own token
limit, or its caller ends it: a chat reply that met a stop string). Measured on the default model: the 200 test
captions took 41 s instead of 55 s, with the same outputs; short VQA answers gain nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

# (logits [n, V] of the rows still decoding, those rows' indices in the batch [n]) -> the next tokens [n]
TokenPicker = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] attention mask -> [B, S] position ids that skip the left padding (0 on it), as `generate` derives
    them: the cached prefix and the tokens decoded after it must agree on this."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def argmax(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Greedy: the likeliest token of every row."""
    return logits.argmax(-1)


@torch.inference_mode()
def decode_steps(llm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache,
                 max_new_tokens: int | Sequence[int], eos_id: int, pick: TokenPicker = argmax,
                 stop: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (rows [n], tokens [n]) at each step: the next token of each row of the batch still decoding.

    input_ids / attention_mask [B, S]: whole rows, whose first `cache.get_seq_length()` tokens are already in
    `cache` (a transformers Cache, modified in place; their ids are never read). Positions follow the mask (left
    padding is skipped), as `generate` derives them. A row leaves the batch after the step that gave it
    end-of-turn, its `max_new_tokens` (one limit for all rows, or one per row), or, while that step is yielded,
    its caller set `stop[row]` (a [B] bool tensor the caller may write to).
    """
    limits = torch.as_tensor(max_new_tokens, device=input_ids.device).expand(len(input_ids))
    if (limits < 1).any():
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    cached = cache.get_seq_length()
    positions = mask_positions(attention_mask)
    logits = llm(input_ids=input_ids[:, cached:], attention_mask=attention_mask, position_ids=positions[:, cached:],
                 cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    rows = torch.arange(len(input_ids), device=input_ids.device)  # the batch's rows still decoding
    mask = attention_mask
    for step in range(int(limits.max())):
        token = pick(logits, rows)
        yield rows, token
        going = (token != eos_id) & (limits[rows] > step + 1)
        if stop is not None:
            going &= ~stop.to(going.device)[rows]
        if not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            rows, token, mask = rows[keep], token[keep], mask[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        logits = llm(input_ids=token[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                     cache=cache, use_cache=True).logits[:, -1]


@torch.inference_mode()
def greedy_decode(llm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache,
                  max_new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """`decode_steps` with greedy picks, collected: [B, max_new_tokens] the new tokens, end-of-turn included,
    then `pad_id`."""
    output = torch.full((len(input_ids), max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
    for step, (rows, token) in enumerate(decode_steps(llm, input_ids, attention_mask, cache, max_new_tokens,
                                                      eos_id)):
        output[rows, step] = token
    return output
