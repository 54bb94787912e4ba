import time, torch, copy
from pathlib import Path
from vlm.config import load_params
from vlm.data.embeddings import load_embeddings, gather, expected_metadata
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import load_tasks
p = load_params()
m32 = VisionLanguageModel.load(Path("models/vlm")).eval()
m16 = copy.deepcopy(m32).to(torch.bfloat16)
emb = load_embeddings(Path("data/embeddings/test"), expect=expected_metadata(p.backbone))
cap, vqa = load_tasks(Path("data/dataset/test.parquet"), p.llm)
ids = emb.image_ids[:24]
tasks = [t for t in cap + vqa if t.image_id in set(ids)]
tasks.sort(key=lambda t: t.image_id)
def run(model, dtype):
    out = []
    a = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(tasks), 128):
            chunk = tasks[start:start + 128]
            iids = list(dict.fromkeys(t.image_id for t in chunk)); pos = {i: k for k, i in enumerate(iids)}
            mx = 48 if any(t.kind == "caption" for t in chunk) else 8
            out += model.generate(gather(emb, iids).to(dtype), [t.instruction for t in chunk], mx, 1, image_index=[pos[t.image_id] for t in chunk])
    return time.perf_counter() - a, out
print(len(tasks), "tasks")
for r in range(2):
    t32, o32 = run(m32, torch.float32); t16, o16 = run(m16, torch.bfloat16)
    same = sum(a == b for a, b in zip(o32, o16)) / len(o32)
    print(f"fp32 {t32:.1f}s bf16 {t16:.1f}s same {same:.3f}")
for t, a, b in list(zip(tasks, o32, o16))[:12]:
    if a != b: print(t.kind, repr(a), repr(b))
