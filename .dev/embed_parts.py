import time, torch, tempfile
from pathlib import Path
from benchmarks.workspace import Workspace
from vlm.data.dataset_io import decode_image, read_split
from vlm.data.embeddings import EmbeddingWriter
from vlm.precision import autocast
ws = Workspace(Path("models/base"), images=512)
bb = ws.backbone; cfg = ws.params.backbone
t = read_split(ws.dataset, columns=["image_id", "image"])
ids = t.column("image_id").to_pylist(); datas = t.column("image").to_pylist()
B = cfg.batch_size
for rep in range(2):
    T = dict(read=0, decode=0, pre=0, fwd=0, write=0)
    a = time.perf_counter(); t = read_split(ws.dataset, columns=["image_id", "image"]); T["read"] += time.perf_counter() - a
    with tempfile.TemporaryDirectory() as d, EmbeddingWriter(Path(d) / "x.parquet", bb.num_tokens, bb.hidden_size, {}, row_group_size=B) as w:
        for s in range(0, 512, B):
            a = time.perf_counter(); ims = [decode_image(x, i) for x, i in zip(datas[s:s+B], ids[s:s+B])]; b = time.perf_counter(); T["decode"] += b - a
            px = bb.preprocess(ims); c = time.perf_counter(); T["pre"] += c - b
            with torch.inference_mode(), autocast("bf16"):
                tok = bb(px)
            e = time.perf_counter(); T["fwd"] += e - c
            w.write(ids[s:s+B], tok.float()); T["write"] += time.perf_counter() - e
    print({k: f"{v/512*1e3:.2f} ms/img" for k, v in T.items()})
