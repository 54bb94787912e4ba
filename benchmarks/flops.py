"""FLOP counting for a `train_vlm` step, and the matmul peak it is compared with (MFU).

Counting rules (matmuls only: norms, activations, softmax, rotary and the loss are a rounding error here):

* A linear layer with W weights applied to T tokens costs 2·W·T forward, another 2·W·T for the gradient of its
  input (when something before it trains) and another 2·W·T for the gradient of its weights (when it trains):
  6·W·T for a trained layer, 4·W·T for a frozen one that gradients must flow through (every frozen LLM layer:
  LoRA and the visual tokens sit below them), 2·W·T for one that only runs forward (a frozen Q-Former).
* Attention costs 2·width FLOPs per (query, key) pair for the scores and 2·width for the weighted sum
  (width = heads · head dim), 4·width per pair forward and twice that backward. Only the pairs the mask allows
  are counted: a packed row's turns see the shared prefix and themselves, causally.
* Tokens are the real ones of each packed row, never padding, and the LM head runs on answer tokens only (as
  `VisionLanguageModel.forward` does). So the count is the work the model needs (model FLOPs, the "M" of MFU),
  not what the kernels happened to execute.

The parameter counts are read from the model's own modules (nn.Linear weights, with their requires_grad), so
LoRA rank, projector width and Q-Former depth follow params.yaml. `tests/test_bench.py` checks the linear part
against torch's FlopCounterMode on a tiny model and the attention pairs against the packing's own mask.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlm.models.prompt import Example


def linear_flops(weights: int, tokens: int, weight_grad: bool, input_grad: bool) -> int:
    """Forward + backward FLOPs of a linear layer with `weights` weights over `tokens` tokens."""
    return 2 * weights * tokens * (1 + int(input_grad) + int(weight_grad))


def attention_flops(pairs: int, width: int, backward: bool = True) -> int:
    """Scores (2·width) and weighted sum (2·width) per allowed (query, key) pair; backward is twice forward."""
    return 4 * width * pairs * (3 if backward else 1)


def causal_pairs(length: int) -> int:
    """Allowed pairs of causal attention over `length` tokens: each token sees itself and all before it."""
    return length * (length + 1) // 2


def packed_pairs(shared: int, turn_lengths: Iterable[int]) -> int:
    """Allowed pairs of one packed row (`vlm/models/packing.py`): the shared prefix is causal, and each turn sees
    the whole prefix plus its own earlier tokens."""
    return causal_pairs(shared) + sum(length * shared + causal_pairs(length) for length in turn_lengths)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _linear_sum(module: nn.Module | None, tokens: int, input_grad: bool) -> int:
    """All of `module`'s linear layers over the same `tokens`; each trains if its weight requires grad."""
    if module is None:
        return 0
    return sum(linear_flops(m.weight.numel(), tokens, m.weight.requires_grad, input_grad) for m in _linears(module))


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step, by part."""

    llm_linear: int      # decoder layers' projections (frozen base weights and LoRA)
    llm_attention: int
    lm_head: int         # on answer tokens only
    qformer_linear: int  # image path: query self-attention, cross-attention to the image, query FFN
    qformer_attention: int
    projector: int
    llm_tokens: int      # real (non-padding) tokens through the LLM
    target_tokens: int

    @property
    def total(self) -> int:
        return self.linear + self.llm_attention + self.qformer_attention

    @property
    def linear(self) -> int:
        """Every linear layer's share (what torch's FlopCounterMode sees on CPU, where it skips SDPA)."""
        return self.llm_linear + self.lm_head + self.qformer_linear + self.projector


def _trains(*modules: nn.Module | None) -> bool:
    return any(p.requires_grad for m in modules if m is not None for p in m.parameters())


def _one(layer: nn.Linear, tokens: int, input_grad: bool) -> int:
    return linear_flops(layer.weight.numel(), tokens, layer.weight.requires_grad, input_grad)


def _attention_block(block: nn.Module, queries: int, keys: int, pairs: int, width: int, flowing: bool,
                     context_flowing: bool) -> tuple[int, int, bool]:
    """(linear, attention FLOPs, gradient flowing out) of a Q-Former attention block whose queries read an
    activation with (`flowing`) or without a gradient path, and whose keys/values read a context likewise."""
    linear = _one(block.query, queries, flowing)
    linear += _one(block.key, keys, context_flowing) + _one(block.value, keys, context_flowing)
    scores = flowing or context_flowing or _trains(block.query, block.key, block.value)
    linear += _one(block.output, queries, scores)
    return linear, attention_flops(pairs, width, backward=scores), scores or _trains(block.output, block.layer_norm)


def qformer_image_flops(qformer: nn.Module, images: int, image_tokens: int) -> tuple[int, int, bool]:
    """(linear FLOPs, attention FLOPs, whether a gradient flows out of it) of `QFormer.encode_image`, forward
    and backward, for `images` images of `image_tokens` tokens each.

    A layer computes its input's gradient only if something before it trains (the queries, an earlier layer),
    and a weight's gradient only if the weight trains; with the Q-Former frozen (train_vlm.qformer_lr: 0) it
    runs forward only. Keys and values of the cross-attention read cached image tokens, which need no gradient.
    """
    config = qformer.config
    queries = images * config.num_queries
    hidden = config.hidden_size
    linear = attention = 0
    flowing = qformer.query_tokens.requires_grad or _trains(qformer.embed_layer_norm)
    for layer in qformer.layers:
        block = _attention_block(layer.self_attention, queries, queries, images * config.num_queries ** 2,
                                 hidden, flowing, flowing)
        linear, attention, flowing = linear + block[0], attention + block[1], block[2]
        if layer.cross_attention is not None:
            block = _attention_block(layer.cross_attention, queries, images * image_tokens,
                                     images * config.num_queries * image_tokens, hidden, flowing, False)
            linear, attention, flowing = linear + block[0], attention + block[1], block[2]
        ffn = layer.query_ffn if layer.query_ffn is not None else layer.text_ffn
        linear += _one(ffn.dense_in, queries, flowing)
        linear += _one(ffn.dense_out, queries, flowing or _trains(ffn.dense_in))
        flowing = flowing or _trains(ffn)
    return linear, attention, flowing


def vlm_step_flops(model: nn.Module, image_tokens: int, rows: Sequence[Sequence[Example]],
                   visual_tokens: Sequence[int] | None = None) -> StepFlops:
    """Model FLOPs of `VisionLanguageModel.forward(image_embeds, rows)` + backward, one row per image.
    `visual_tokens`: the length of each row's visual block, where empty cells are left out (default: all of it)."""
    images = len(rows)
    num_queries = model.qformer.config.num_queries
    if visual_tokens is None:
        visual_tokens = [model.num_visual_tokens] * images  # the queries, and the cell labels if on
    shared = [len(model.prompt.prefix_ids) + count for count in visual_tokens]  # + the system turn
    turn_lengths = [[t.num_tokens for t in turns] for turns in rows]
    llm_tokens = sum(row_shared + sum(lengths) for row_shared, lengths in zip(shared, turn_lengths))
    target_tokens = sum(len(t.answer_ids) for turns in rows for t in turns)
    base = model.llm.get_base_model()
    config = base.config
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    pairs = sum(packed_pairs(row_shared, lengths) for row_shared, lengths in zip(shared, turn_lengths))
    qformer_linear, qformer_attention, flowing = qformer_image_flops(model.qformer, images, image_tokens)
    first, *rest = _linears(model.projector)
    projector = _one(first, images * num_queries, flowing)
    flowing = flowing or first.weight.requires_grad
    for layer in rest:
        projector += _one(layer, images * num_queries, flowing)
        flowing = flowing or layer.weight.requires_grad
    # Every LLM layer passes gradients down: to LoRA in the layers below and to the visual tokens (projector).
    return StepFlops(
        llm_linear=_linear_sum(base.model.layers, llm_tokens, input_grad=True),
        llm_attention=config.num_hidden_layers * attention_flops(pairs, width),
        lm_head=_linear_sum(base.lm_head, target_tokens, input_grad=True),
        qformer_linear=qformer_linear,
        qformer_attention=qformer_attention,
        projector=projector,
        llm_tokens=llm_tokens,
        target_tokens=target_tokens,
    )


def matmul_peak(dtype: torch.dtype, repeats: int = 5, min_seconds: float = 0.05, max_size: int = 2048
                ) -> tuple[float, int]:
    """(best FLOP/s of an n x n matmul, n): n doubles from 128 until one product takes `min_seconds` (so an
    emulated, slow dtype gets a small n and a fast one a large n), then the best of `repeats` products."""
    size = 128
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up: allocation, kernel selection
        start = time.perf_counter()
        torch.mm(a, b)
        if time.perf_counter() - start >= min_seconds or size >= max_size:
            break
        size *= 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best, size


class MatmulProbe:
    """The matmul rate sampled between the steps of a run, one `size` x `size` product per call (the size
    `matmul_peak` picked): on a VM whose speed drifts by tens of percent within minutes, a best-of-5 taken before and after the
    steps swung from 612 to 1942 GFLOP/s in bf16 between runs, so the median of samples taken among the steps
    is the rate the steps themselves could have had."""

    def __init__(self, dtype: torch.dtype, size: int):
        self.size = size
        self.a = torch.randn(self.size, self.size, dtype=dtype)
        self.b = torch.randn(self.size, self.size, dtype=dtype)
        self.rates: list[float] = []
        self.seconds = 0.0  # spent probing, to take out of the steps' time

    def __call__(self) -> None:
        start = time.perf_counter()
        torch.mm(self.a, self.b)
        took = time.perf_counter() - start
        self.rates.append(2 * self.size ** 3 / took)
        self.seconds += took

    def median(self) -> float:
        if not self.rates:
            raise ValueError("MatmulProbe: no samples taken")
        return statistics.median(self.rates)
