"""Train LoRA on a frozen LLM under bf16 autocast without paying for autocast's casts.

Autocast keeps the weights in fp32 and casts each one to bf16 on every forward, so each stage-2 step rereads and
rewrites the frozen LLM's 135M weights; peft casts LoRA's input up to the adapter's fp32 and autocast casts it
back down, twice for each adapted layer. The numbers that reach the matmuls are bf16 either way. So, for the
duration of training:

- the frozen weights are held in bf16 (the trainable LoRA matrices stay fp32 for the optimizer). For the linear
  layers that is exactly what autocast would hand the matmuls. For the RMSNorm weights it keeps each norm's
  output in bf16: with an fp32 weight, autocast leaves the product fp32 and every following layer (q, k, v,
  gate, up, LoRA) casts it down again, each a copy of the activations. Where a norm weight is a bf16 number
  (SmolLM2's all are: it was trained in bf16) the results do not change by a bit; elsewhere the weight rounds as
  in a model loaded in bf16;
- peft's input cast is off (`peft.helpers.disable_input_dtype_casting`), the same numbers again;
- on a CPU, the LLM attends with transformers' eager attention instead of SDPA, whose fused CPU kernel is slow
  in bf16, in backward most. On CUDA SDPA stays.

Each of the three shortens a bf16 stage-2 step on a CPU (docs/experiments/speed.md). In fp32 nothing here
applies (eager and SDPA ran equally fast there).
On exit the fp32 weights, the cast and the attention come back as they were, so the model then generates as
before training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from peft.helpers import disable_input_dtype_casting

if TYPE_CHECKING:
    from vlm.models.vlm import VisionLanguageModel


@contextmanager
def frozen_llm_in_bf16(model: VisionLanguageModel, eager_attention: bool) -> Iterator[None]:
    """The model's LLM as above while inside; use inside, or around, bf16 autocast."""
    # By identity: a tied LM head and input embedding are one parameter.
    frozen = {id(param): param for param in model.llm.parameters()
              if not param.requires_grad and param.dtype == torch.float32}
    kept = {key: param.data for key, param in frozen.items()}
    base = model.base_llm
    attention = base.config._attn_implementation
    try:
        for param in frozen.values():
            param.data = param.data.to(torch.bfloat16)
        if eager_attention:
            base.set_attn_implementation("eager")
        with disable_input_dtype_casting(model.llm):
            yield
    finally:
        for key, param in frozen.items():
            param.data = kept[key]
        if eager_attention:
            base.set_attn_implementation(attention)
