"""Shared-prefix packing: several turns about one image in one row, each seeing only the prefix and itself.

A training row is

    system turn | visual tokens | turn 1 (user + answer) | turn 2 | ... | padding

and the attention mask makes turn k attend to the shared part (system + visual tokens) and to its own earlier
tokens, never to another turn. Every turn restarts its position ids right after the shared part, so each turn
is computed exactly as if it were the only one (the single-turn prompt used at inference), while the shared
part runs once per image instead of once per question. On CPU, where the LLM's forward/backward is the whole
cost of stage 2, this matters: single-turn batches pad every short VQA row to caption length. Measured on the
default data (2 cores): 0.20 s per supervised answer packed, 0.31 s in single-turn batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from vlm.models.prompt import IGNORE_INDEX, Example

SHARED, PADDING = 0, -1  # segment ids; turns are numbered 1, 2, ...

# Training batches are padded to a multiple of this many tokens. On a CPU, oneDNN builds its matmul kernels for
# each new shape, and the first call of a shape ran a step ~25% slower than the same step again (2 cores, AMX
# bf16); with the row length free, nearly every stage-2 step brought new shapes. A multiple of 16 leaves ~10
# lengths in a run for ~4% more tokens (README, "Precision").
TRAIN_LENGTH_MULTIPLE = 16


@dataclass(frozen=True)
class PackedRows:
    """Token layout of a batch (all [B, L]); visual slots hold `pad_id` in `ids` until embeddings replace them."""

    ids: torch.Tensor
    is_visual: torch.Tensor
    segments: torch.Tensor  # SHARED for system + visual tokens, k for the k-th turn, PADDING elsewhere
    position_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX except on answer tokens (and their end-of-turn): `Example.labels`

    def to(self, device: torch.device) -> PackedRows:
        return PackedRows(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, L] 1 for real tokens: enough for single-turn rows (what generation uses)."""
        return (self.segments != PADDING).long()


def pack(prefix_ids: Sequence[int], num_visual: int | Sequence[int], rows: Sequence[Sequence[Example]],
         pad_id: int, left_pad: bool, length_multiple: int = 1) -> PackedRows:
    """Lay out `rows` (each: the turns about one image) with right padding, or left padding for generation.
    `num_visual`: the visual tokens of every row, or of each row (with empty cells left out they differ).
    `length_multiple`: pad every row to a multiple of this many tokens (see `TRAIN_LENGTH_MULTIPLE`)."""
    if any(not turns for turns in rows):
        raise ValueError("every row needs at least one turn")
    visual = [num_visual] * len(rows) if isinstance(num_visual, int) else list(num_visual)
    if len(visual) != len(rows):
        raise ValueError(f"{len(visual)} visual-token counts for {len(rows)} rows")
    if left_pad and any(len(turns) > 1 for turns in rows):
        raise ValueError("left padding is for generation, which takes one turn per row")
    shared_lengths = [len(prefix_ids) + count for count in visual]
    lengths = [shared + sum(turn.num_tokens for turn in turns) for shared, turns in zip(shared_lengths, rows)]
    if length_multiple < 1:
        raise ValueError(f"length_multiple must be at least 1, got {length_multiple}")
    batch, length = len(rows), -(-max(lengths) // length_multiple) * length_multiple
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    is_visual = torch.zeros(batch, length, dtype=torch.bool)
    segments = torch.full((batch, length), PADDING, dtype=torch.long)
    position_ids = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, (turns, shared, row_length) in enumerate(zip(rows, shared_lengths, lengths)):
        start = length - row_length if left_pad else 0
        ids[row, start:start + len(prefix_ids)] = torch.tensor(prefix_ids, dtype=torch.long)
        is_visual[row, start + len(prefix_ids):start + shared] = True
        segments[row, start:start + shared] = SHARED
        position_ids[row, start:start + shared] = torch.arange(shared)
        cursor = start + shared
        for number, turn in enumerate(turns, start=1):
            text = turn.user_ids + turn.answer_ids
            span = slice(cursor, cursor + len(text))
            ids[row, span] = torch.tensor(text, dtype=torch.long)
            segments[row, span] = number
            position_ids[row, span] = torch.arange(shared, shared + len(text))
            if turn.answer_ids or turn.targets:
                labels[row, span] = torch.tensor(turn.labels, dtype=torch.long)
            cursor = span.stop
    return PackedRows(ids, is_visual, segments, position_ids, labels)


def turn_attention_mask(segments: torch.Tensor, attention_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] mask letting query i see key j when j is causal and in the shared part or i's own turn.

    Boolean (True = attend) for SDPA; additive (0 or the dtype's minimum) for eager attention, which adds the
    mask to the scores. Padding queries see the shared part, so no softmax row is empty (an all-masked row
    gives NaN, and NaN times a zero gradient is still NaN).
    """
    if attention_implementation not in ("sdpa", "eager"):
        raise ValueError(f"packed turns need a 4D attention mask, which '{attention_implementation}' attention "
                         "does not take; load the LLM with attn_implementation='sdpa' or 'eager'")
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (causal & ((key == SHARED) | (key == query)) & (key != PADDING))[:, None]
    if attention_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)
