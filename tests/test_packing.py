"""Shared-prefix packing: layout, position ids, labels, and which token may attend to which."""

from __future__ import annotations

import pytest
import torch

from vlm.models.packing import PADDING, SHARED, pack, turn_attention_mask
from vlm.models.prompt import IGNORE_INDEX, Example

PREFIX, VISUAL, PAD = (1, 2), 3, 0
TURN_A = Example(user_ids=(10, 11), answer_ids=(12, 99))
TURN_B = Example(user_ids=(20,), answer_ids=(21, 22, 99))


def test_turns_follow_the_shared_part_and_restart_its_positions() -> None:
    layout = pack(PREFIX, VISUAL, [[TURN_A, TURN_B], [TURN_B]], PAD, left_pad=False)
    shared = len(PREFIX) + VISUAL
    assert layout.ids[0].tolist() == [1, 2, PAD, PAD, PAD, 10, 11, 12, 99, 20, 21, 22, 99]
    assert layout.is_visual[0].tolist() == [False, False] + [True] * VISUAL + [False] * 8
    assert layout.segments[0].tolist() == [SHARED] * shared + [1] * 4 + [2] * 4
    # Every turn starts at the position right after the visual tokens, as it would alone.
    assert layout.position_ids[0].tolist() == list(range(shared)) + [5, 6, 7, 8] + [5, 6, 7, 8]
    assert layout.labels[0].tolist() == [IGNORE_INDEX] * 7 + [12, 99] + [IGNORE_INDEX, 21, 22, 99]
    # The shorter row is right-padded; padding is no target and no real token.
    assert layout.segments[1].tolist() == [SHARED] * shared + [1] * 4 + [PADDING] * 4
    assert layout.attention_mask[1].tolist() == [1] * 9 + [0] * 4
    assert (layout.labels[1, 9:] == IGNORE_INDEX).all()


def test_a_turn_sees_the_shared_part_and_its_own_past_only() -> None:
    layout = pack(PREFIX, VISUAL, [[TURN_A, TURN_B], [TURN_B]], PAD, left_pad=False)
    allowed = turn_attention_mask(layout.segments, "sdpa", torch.float32)[:, 0]
    shared = len(PREFIX) + VISUAL
    first_of_b = shared + 4
    assert allowed[0, first_of_b].tolist() == [True] * shared + [False] * 4 + [True] + [False] * 3
    assert allowed[0, shared + 2].tolist() == [True] * (shared + 3) + [False] * 5  # causal inside turn A
    assert allowed[0, 2].tolist() == [True] * 3 + [False] * 10  # the shared part is causal too
    # Padding queries still see something (no empty softmax row), padding keys are never seen.
    assert allowed[1].any(dim=-1).all()
    assert not allowed[1, :, 9:].any()


def test_eager_attention_gets_the_same_mask_as_additive_bias() -> None:
    segments = pack(PREFIX, VISUAL, [[TURN_A, TURN_B]], PAD, left_pad=False).segments
    allowed = turn_attention_mask(segments, "sdpa", torch.float32)
    bias = turn_attention_mask(segments, "eager", torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    assert torch.equal(bias == 0, allowed)
    assert (bias[~allowed] == torch.finfo(torch.bfloat16).min).all()


def test_flash_attention_is_refused_with_the_fix() -> None:
    segments = pack(PREFIX, VISUAL, [[TURN_A]], PAD, left_pad=False).segments
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        turn_attention_mask(segments, "flash_attention_2", torch.float32)


def test_generation_layout_is_left_padded_single_turns() -> None:
    short = Example(user_ids=(30,), answer_ids=())
    layout = pack(PREFIX, VISUAL, [[TURN_A], [short]], PAD, left_pad=True)
    assert layout.attention_mask.tolist() == [[1] * 9, [0, 0, 0] + [1] * 6]
    assert layout.is_visual[1].tolist() == [False] * 5 + [True] * VISUAL + [False]  # shifted with its row
    with pytest.raises(ValueError, match="one turn per row"):
        pack(PREFIX, VISUAL, [[TURN_A, TURN_B]], PAD, left_pad=True)
    with pytest.raises(ValueError, match="at least one turn"):
        pack(PREFIX, VISUAL, [[]], PAD, left_pad=False)


def test_a_layout_moves_to_a_device_whole() -> None:
    layout = pack(PREFIX, VISUAL, [[TURN_A, TURN_B]], PAD, left_pad=False)
    moved = layout.to(torch.device("meta"))
    assert all(getattr(moved, name).device.type == "meta"
               for name in ("ids", "is_visual", "segments", "position_ids", "labels"))
    assert moved.ids.shape == layout.ids.shape


def test_rows_may_have_visual_blocks_of_their_own_length() -> None:
    """With empty cells left out, each image's visual block has its own length; its turns start after it."""
    layout = pack(PREFIX, [3, 1], [[TURN_A], [TURN_A]], PAD, left_pad=False)
    assert layout.is_visual.sum(1).tolist() == [3, 1]
    assert layout.position_ids[0].tolist() == list(range(9))
    assert layout.position_ids[1].tolist() == list(range(7)) + [0, 0]
    assert layout.segments[1].tolist() == [SHARED] * 3 + [1] * 4 + [PADDING] * 2
    assert layout.labels[1].tolist() == [IGNORE_INDEX] * 5 + [12, 99] + [IGNORE_INDEX] * 2
    left = pack(PREFIX, [3, 1], [[TURN_A], [TURN_A]], PAD, left_pad=True)
    assert left.attention_mask[1].tolist() == [0, 0] + [1] * 7
    with pytest.raises(ValueError, match="2 visual-token counts for 1 rows"):
        pack(PREFIX, [3, 1], [[TURN_A]], PAD, left_pad=False)


def test_length_multiple_only_adds_padding() -> None:
    rows = [[TURN_A, TURN_B], [TURN_B]]
    exact = pack(PREFIX, VISUAL, rows, PAD, left_pad=False)
    padded = pack(PREFIX, VISUAL, rows, PAD, left_pad=False, length_multiple=8)
    assert exact.ids.shape[1] == 13 and padded.ids.shape[1] == 16
    for name in ("ids", "is_visual", "segments", "position_ids", "labels"):
        assert torch.equal(getattr(padded, name)[:, :13], getattr(exact, name)), name
    assert (padded.segments[:, 13:] == PADDING).all() and (padded.labels[:, 13:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="length_multiple"):
        pack(PREFIX, VISUAL, rows, PAD, left_pad=False, length_multiple=0)
