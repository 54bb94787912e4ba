"""The greedy decoder: rows leave the batch (and the KV cache) as they end, and each gets its own tokens."""

from types import SimpleNamespace

import pytest
import torch

from vlm.models.greedy import decode_steps, greedy_decode

EOS, PAD, VOCAB = 0, 99, 100


class ScriptedCache:
    """Stands in for a transformers Cache: remembers which original row each cache row belongs to."""

    def __init__(self, batch: int, length: int) -> None:
        self.rows, self.length = torch.arange(batch), length

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows = self.rows[indices]


class ScriptedLLM:
    """Row r answers `scripts[r]` token by token (then end-of-turn), whatever it is fed; records each call."""

    def __init__(self, scripts: list[list[int]]) -> None:
        self.scripts, self.calls = scripts, []

    def __call__(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep=None):
        assert len(input_ids) == len(attention_mask) == len(position_ids) == len(cache.rows)
        self.calls.append({"rows": cache.rows.tolist(), "positions": position_ids[:, -1].tolist(),
                           "mask_width": attention_mask.shape[1]})
        step = len(self.calls) - 1
        logits = torch.zeros(len(input_ids), 1, VOCAB)
        for i, row in enumerate(cache.rows.tolist()):
            script = self.scripts[row] + [EOS]
            logits[i, 0, script[min(step, len(script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits)


def decode(scripts: list[list[int]], max_new_tokens: int, left_pad: list[int]):
    cached, user = 3, 2
    width = cached + user + max(left_pad)
    ids = torch.full((len(scripts), width), 7)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(left_pad):  # padding between the cached part and the user turn, as generate lays out
        mask[row, cached:cached + max(left_pad) - pad] = 0
    llm = ScriptedLLM(scripts)
    output = greedy_decode(llm, ids, mask, ScriptedCache(len(scripts), cached), max_new_tokens, EOS, PAD)
    return output, llm.calls, mask


def test_each_row_gets_its_tokens_then_end_of_turn_then_padding() -> None:
    output, _, _ = decode([[5, 6], [7], [8, 9, 10]], max_new_tokens=5, left_pad=[0, 0, 0])
    assert output.tolist() == [[5, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD], [8, 9, 10, EOS, PAD]]


def test_finished_rows_leave_the_batch_and_the_cache() -> None:
    _, calls, _ = decode([[5, 6], [7], [8, 9, 10]], max_new_tokens=5, left_pad=[0, 0, 0])
    assert [call["rows"] for call in calls] == [[0, 1, 2], [0, 1, 2], [0, 2], [2]]
    assert len(calls) == 4, "no forward pass after the last row ends"


def test_positions_skip_the_left_padding_and_run_on_per_row() -> None:
    _, calls, mask = decode([[5, 6, 7], [8, 9, 10]], max_new_tokens=4, left_pad=[2, 0])
    real = mask.sum(1)  # the prompt's last token sits at position real - 1
    assert calls[0]["positions"] == (real - 1).tolist()
    assert calls[1]["positions"] == real.tolist()
    assert calls[2]["positions"] == (real + 1).tolist()
    assert [call["mask_width"] for call in calls] == [mask.shape[1] + k for k in range(len(calls))]


def test_the_length_limit_cuts_a_row_that_never_ends() -> None:
    output, calls, _ = decode([[5, 6, 7, 8], [9]], max_new_tokens=3, left_pad=[0, 0])
    assert output.tolist() == [[5, 6, 7], [9, EOS, PAD]]
    assert len(calls) == 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode([[5]], max_new_tokens=0, left_pad=[0])


def test_rows_leave_at_their_own_limit_or_when_their_caller_stops_them() -> None:
    scripts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    llm, cache = ScriptedLLM(scripts), ScriptedCache(3, 3)
    ids, mask = torch.full((3, 5), 7), torch.ones(3, 5, dtype=torch.long)
    stop = torch.zeros(3, dtype=torch.bool)
    seen = []
    for rows, tokens in decode_steps(llm, ids, mask, cache, [4, 2, 4], EOS, stop=stop):
        seen.append(dict(zip(rows.tolist(), tokens.tolist())))
        if 14 in tokens.tolist():
            stop[2] = True  # row 2's caller has what it wants after its second token
    assert seen == [{0: 5, 1: 9, 2: 13}, {0: 6, 1: 10, 2: 14}, {0: 7}, {0: 8}]
    assert [call["rows"] for call in llm.calls] == [[0, 1, 2], [0, 1, 2], [0], [0]]
