import sys, torch, itertools
from pathlib import Path
from benchmarks.workspace import Workspace
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import load_tasks, with_embeddings, conversation_batches
from vlm.train.bf16_llm import frozen_llm_in_bf16
from vlm.precision import autocast, attention_kernels
from torch.profiler import profile, ProfilerActivity
ws = Workspace(Path("models/base"), images=64)
p = ws.params
torch.manual_seed(0)
model = VisionLanguageModel.create(ws.qformer_dir, ws.models / "llm", p.projector.hidden_dim, p.lora, p.llm.system_prompt)
emb = ws.embeddings
cap, vqa = load_tasks(ws.dataset, p.llm)
batches = list(itertools.islice(conversation_batches(emb, with_embeddings(emb, cap + vqa), model.prompt, 4, 0), 2))
model.train(); model.qformer.requires_grad_(False).eval()
with frozen_llm_in_bf16(model, eager_attention=True):
    def step(b):
        with autocast("bf16"), attention_kernels("bf16"):
            loss = model(b[0], b[1], average="turn")
        loss.backward(); model.zero_grad(set_to_none=True)
    step(batches[0])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as pr:
        step(batches[1])
print(pr.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=30, max_shapes_column_width=70))
print(pr.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=20, max_src_column_width=120))
