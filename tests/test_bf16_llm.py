"""Stage 2 under bf16: the frozen LLM held in bf16 computes what autocast computes, and comes back as it was; the
attention kernels chosen for bf16 training on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import image_embeds, tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

import vlm.precision
from vlm.models.vlm import VisionLanguageModel
from vlm.train.bf16_llm import frozen_llm_in_bf16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_vlm_folders(tmp_path_factory.mktemp("bf16_llm"))


def rows(model: VisionLanguageModel):
    turns = [model.prompt.example("what is it?", "a red circle"), model.prompt.example("how many?", "two")]
    return [turns, turns[1:]]


def bf16_loss_and_grads(model: VisionLanguageModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 2's loss under bf16 autocast (run as on a CPU with native bf16 or emulated), and LoRA's gradients."""
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(image_embeds(2), rows(model), average="turn")
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.llm.named_parameters() if p.requires_grad}


def test_frozen_llm_in_bf16_gives_autocasts_numbers(folders) -> None:
    """bf16 weights held = the weights autocast would cast; norm weights that are bf16 numbers (as the tiny
    model's ones, and SmolLM2's) give the same products in bf16; peft's fp32 round trip of LoRA's input changes
    no number either. So the loss is the same to the bit. (SDPA kept here, so that only these differ from the
    plain autocast run.) The gradients differ by rounding alone: a norm's output is now bf16, so the gradients
    its consumers (q, k, v, LoRA) send back are summed in bf16 rather than fp32."""
    model = tiny_vlm(folders, perturb_seed=1).train()
    reference_loss, reference_grads = bf16_loss_and_grads(model)
    with frozen_llm_in_bf16(model, eager_attention=False):
        loss, grads = bf16_loss_and_grads(model)
    torch.testing.assert_close(loss, reference_loss, atol=0, rtol=0)
    for name, grad in grads.items():  # measured: at most 1.0% (bf16 keeps 8 bits, 0.4% a rounding)
        assert (grad - reference_grads[name]).norm() <= 0.03 * reference_grads[name].norm(), name


def test_frozen_llm_in_bf16_holds_only_frozen_weights_in_bf16_and_restores_them(folders) -> None:
    model = tiny_vlm(folders, perturb_seed=1)
    before = {name: p.detach().clone() for name, p in model.llm.named_parameters()}
    base = model.base_llm
    with frozen_llm_in_bf16(model, eager_attention=True):
        for name, param in model.llm.named_parameters():  # LoRA trains in fp32
            assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
        assert any("norm" in name and param.dtype == torch.bfloat16 for name, param in model.llm.named_parameters())
        assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16  # tied to the LM head
        assert base.config._attn_implementation == "eager"
        assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.llm.modules())
        with torch.autocast("cpu", torch.bfloat16):  # it trains: the tied embedding reads in bf16 too
            model(image_embeds(2), rows(model)).backward()
    assert base.config._attn_implementation == "sdpa"
    assert all(m.cast_input_dtype_enabled for m in model.llm.modules() if hasattr(m, "cast_input_dtype_enabled"))
    for name, param in model.llm.named_parameters():
        assert param.dtype == torch.float32, name
        if not param.requires_grad:
            assert torch.equal(param, before[name]), name  # the very fp32 values, not a bf16 round trip
    with torch.no_grad():  # and the model runs in fp32 again, as generation does
        model.eval().generate(image_embeds(1), ["what is it?"], max_new_tokens=2)


def test_attention_kernels_use_sdpa_math_only_for_bf16_on_a_cpu(monkeypatch) -> None:
    def flash_enabled_inside(precision: str) -> bool:
        with vlm.precision.attention_kernels(precision):
            return torch.backends.cuda.flash_sdp_enabled()  # the flag SDPA's CPU dispatch reads as well

    monkeypatch.setattr(vlm.precision, "bf16_supported", lambda: True)
    assert not flash_enabled_inside("bf16")
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    assert flash_enabled_inside("fp32")
    monkeypatch.setattr(vlm.precision, "bf16_supported", lambda: False)  # falls back to fp32: nothing changes
    assert flash_enabled_inside("bf16")
