import sys, time, torch, itertools
from pathlib import Path
from benchmarks.workspace import Workspace
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import load_tasks, with_embeddings, conversation_batches
from vlm.train.bf16_llm import frozen_llm_in_bf16
from vlm.precision import autocast, attention_kernels
ws = Workspace(Path("models/base"), images=64)
p = ws.params
torch.manual_seed(0)
model = VisionLanguageModel.create(ws.qformer_dir, ws.models / "llm", p.projector.hidden_dim, p.lora, p.llm.system_prompt)
emb = ws.embeddings
cap, vqa = load_tasks(ws.dataset, p.llm)
batches = list(itertools.islice(conversation_batches(emb, with_embeddings(emb, cap + vqa), model.prompt, 4, 0), 3))
model.train(); model.qformer.requires_grad_(False).eval()
base = model.base_llm
T = {"t": 0.0, "n": 0, "shape": None, "dt": None}
def pre(m, a): T["s"] = time.perf_counter(); T["shape"] = tuple(a[0].shape); T["dt"] = (a[0].dtype, m.weight.dtype, a[0].is_contiguous())
def post(m, a, o): T["t"] += time.perf_counter() - T["s"]; T["n"] += 1
for layer in base.model.layers:
    layer.mlp.gate_proj.register_forward_pre_hook(pre); layer.mlp.gate_proj.register_forward_hook(post)
with frozen_llm_in_bf16(model, eager_attention=True):
    for b in batches + batches:
        T.update(t=0.0, n=0)
        a = time.perf_counter()
        with autocast("bf16"), attention_kernels("bf16"):
            loss = model(b[0], b[1], average="turn")
        f = time.perf_counter() - a
        loss.backward(); model.zero_grad(set_to_none=True)
        tot = time.perf_counter() - a
        M = T["shape"][0] * T["shape"][1]
        print(f"step {tot:.2f}s fwd {f:.2f}s gate_proj {T['t']/T['n']*1e3:.2f} ms x{T['n']} shape {T['shape']} {T['dt']} -> {2*M*576*1536/(T['t']/T['n'])/1e9:.0f} GFLOP/s")
    W = base.model.layers[0].mlp.gate_proj.weight
    x = torch.randn(*T["shape"], dtype=torch.bfloat16)
    for _ in range(3): torch.nn.functional.linear(x, W)
    a = time.perf_counter()
    for _ in range(30): torch.nn.functional.linear(x, W)
    print("isolated", (time.perf_counter() - a) / 30 * 1e3, "ms")
