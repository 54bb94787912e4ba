import time, itertools, torch, statistics
from pathlib import Path
from benchmarks.workspace import Workspace
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import load_tasks, with_embeddings, conversation_batches
from vlm.train.bf16_llm import frozen_llm_in_bf16
from vlm.precision import autocast, attention_kernels
ws = Workspace(Path("models/base"), images=128)
p = ws.params
torch.manual_seed(0)
model = VisionLanguageModel.create(ws.qformer_dir, ws.models / "llm", p.projector.hidden_dim, p.lora, p.llm.system_prompt)
emb = ws.embeddings
cap, vqa = load_tasks(ws.dataset, p.llm)
tasks = with_embeddings(emb, cap + vqa)
batches = list(itertools.islice(conversation_batches(emb, tasks, model.prompt, 4, 0), 6))
model.train(); model.qformer.requires_grad_(False).eval()
base = model.base_llm
norms = [m for n, m in base.named_modules() if n.endswith("norm") or "layernorm" in n]
norm_params = [q for m in norms for q in m.parameters()]
print(len(norm_params), "norm params")
flag = {"on": False}
def pre(m, args, kwargs):
    if flag["on"]:
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].to(torch.bfloat16)
        am = kwargs.get("attention_mask")
        if am is not None and am.is_floating_point():
            kwargs["attention_mask"] = am.to(torch.bfloat16)
    return args, kwargs
base.model.register_forward_pre_hook(pre, with_kwargs=True)
fp32_norms = [q.data for q in norm_params]
def set_variant(on):
    flag["on"] = on
    for q, d in zip(norm_params, fp32_norms):
        q.data = d.to(torch.bfloat16) if on else d
def run(on):
    set_variant(on)
    a = time.perf_counter(); losses = []
    for images, rows in batches:
        with autocast("bf16"), attention_kernels("bf16"):
            loss = model(images, rows, average="turn")
        loss.backward(); losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - a) / len(batches), losses
res = {False: [], True: []}
with frozen_llm_in_bf16(model, eager_attention=True):
    for on in (False, True): print("warm", on, run(on)[1][:3])
    for r in range(6):
        for on in (False, True) if r % 2 == 0 else (True, False):
            s, _ = run(on); res[on].append(s)
for on in res: res[on] and print("allbf16" if on else "base", [round(x, 2) for x in res[on]])
seen = []
h = base.model.layers[3].register_forward_hook(lambda m, a, o: seen.append((a[0].dtype, (o[0] if isinstance(o, tuple) else o).dtype)))
h2 = base.model.norm.register_forward_hook(lambda m, a, o: seen.append(("norm", a[0].dtype, o.dtype)))
with frozen_llm_in_bf16(model, eager_attention=True):
    for on in (False, True):
        seen.clear(); print(on, run(on)[1][:2], seen[:2])
