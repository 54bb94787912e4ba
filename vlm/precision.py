"""bf16 where the hardware runs it natively, fp32 elsewhere.

On CPUs without AVX512-BF16/AMX, PyTorch emulates bf16 matmuls and they run hundreds of times slower than
fp32, so `precision: bf16` silently falls back to fp32 there instead of making a run unusably slow
(docs/precision.md).

Where bf16 does run on a CPU, PyTorch's fused CPU attention kernel (SDPA's flash attention) is the slow part of a
training step, in backward most; `attention_kernels` routes SDPA to its plain math kernel there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def bf16_supported() -> bool:
    """True on CUDA with bf16, or on a CPU whose oneDNN reports native bf16 support."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(precision: str) -> AbstractContextManager:
    """The autocast context for `precision` ("bf16" or "fp32") on the current device."""
    if precision != "bf16" or not bf16_supported():
        return nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)


def effective_precision(precision: str) -> str:
    """What `autocast(precision)` really runs, for the metrics file."""
    return "bf16" if precision == "bf16" and bf16_supported() else "fp32"


def bf16_on_cpu(precision: str) -> bool:
    """Whether `autocast(precision)` runs bf16 on a CPU: where PyTorch's fused attention kernel is the slow one."""
    return not torch.cuda.is_available() and effective_precision(precision) == "bf16"


def attention_kernels(precision: str) -> AbstractContextManager:
    """The SDPA kernels a training forward under `autocast(precision)` should use: on a CPU running bf16, the
    math kernel, which is faster there (docs/experiments/speed.md); on CUDA, or in fp32 (where the fused
    kernel is as fast), PyTorch's own choice."""
    return sdpa_kernel(SDPBackend.MATH) if bf16_on_cpu(precision) else nullcontext()
