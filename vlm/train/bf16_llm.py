"""Train LoRA on a frozen LLM under bf16 autocast without paying for autocast's casts.

Autocast keeps the weights in fp32 and casts each one to bf16 on every forward, so each stage-2 step rereads and
rewrites the frozen LLM's 135M weights; peft casts LoRA's input up to the adapter's fp32 and autocast casts it
back down, twice for each adapted layer. The numbers that reach the matmuls are bf16 either way. So, for the
duration of training:

- the frozen linear weights are held in bf16 (the trainable LoRA matrices stay fp32 for the optimizer), which
  is exactly what autocast would hand the matmuls;
- peft's input cast is off (`peft.helpers.disable_input_dtype_casting`), the same numbers again;
- on a CPU, the LLM attends with transformers' eager attention instead of SDPA, whose fused CPU kernel is slow
  in bf16, in backward most. On CUDA SDPA stays.

Measured on 2 cores with AMX bf16 (the default stage-2 batches, 5 rounds each, same process): 2.1-2.4 s a step
before, 1.1-1.6 s with all three. In fp32 nothing here applies (eager and SDPA ran equally fast there).
On exit the fp32 weights, the cast and the attention come back as they were, so the model then generates as
before training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from peft.helpers import disable_input_dtype_casting
from torch import nn

if TYPE_CHECKING:
    from vlm.models.vlm import VisionLanguageModel


@contextmanager
def frozen_llm_in_bf16(model: VisionLanguageModel, eager_attention: bool) -> Iterator[None]:
    """The model's LLM as above while inside; use inside, or around, bf16 autocast."""
    frozen = {}  # by identity: a tied LM head and input embedding are one parameter
    for module in model.llm.modules():
        if isinstance(module, nn.Linear):
            for param in module.parameters(recurse=False):
                if not param.requires_grad and param.dtype == torch.float32:
                    frozen[id(param)] = param
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
