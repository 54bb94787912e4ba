import sys, time, torch
from dataclasses import replace
from pathlib import Path
from benchmarks.workspace import Workspace
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import train_vlm
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
prof = len(sys.argv) > 2 and sys.argv[2] == "prof"
import os, vlm.models.vlm as vm
if os.environ.get("MULT"): vm.TRAIN_LENGTH_MULTIPLE = int(os.environ["MULT"])
ws = Workspace(Path("models/base"), images=256)
p = ws.params
torch.manual_seed(0)
model = VisionLanguageModel.create(ws.qformer_dir, ws.models / "llm", p.projector.hidden_dim, p.lora, p.llm.system_prompt)
emb = ws.embeddings
n = len(emb.image_ids)
cfg = replace(p.train_vlm, epochs=steps * p.train_vlm.batch_size / n, checkpoint_every=0)
starts = []
import os
if os.environ.get("ALLBF16"):
    base = model.base_llm
    for n_, p_ in base.named_parameters():
        if not p_.requires_grad and p_.dtype == torch.float32 and "lora" not in n_:
            p_.data = p_.data.to(torch.bfloat16)
    def pre(m, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].to(torch.bfloat16)
        am = kwargs.get("attention_mask")
        if am is not None and am.is_floating_point():
            kwargs["attention_mask"] = am.to(torch.bfloat16)
        return args, kwargs
    base.model.register_forward_pre_hook(pre, with_kwargs=True)

model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
if prof:
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as pr:
        train_vlm(model, emb, ws.dataset, p.llm, cfg, log_dir=None)
    print(pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
else:
    train_vlm(model, emb, ws.dataset, p.llm, cfg, log_dir=None)
starts.append(time.perf_counter())
d = [round(b - a, 2) for a, b in zip(starts, starts[1:])]
print("MULT", os.environ.get("MULT"), "mean after 2:", round(sum(d[2:]) / max(1, len(d[2:])), 3))
