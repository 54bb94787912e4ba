import time, torch, threading, queue
from pathlib import Path
from benchmarks.workspace import Workspace
from vlm.data.dataset_io import decode_image, read_split
from vlm.precision import autocast
ws = Workspace(Path("models/base"), images=512)
bb = ws.backbone; B = 32
t = read_split(ws.dataset, columns=["image_id", "image"])
ids = t.column("image_id").to_pylist(); datas = t.column("image").to_pylist()
def prep(s): return bb.preprocess([decode_image(x, i) for x, i in zip(datas[s:s+B], ids[s:s+B])])
pre = [prep(s) for s in range(0, 512, B)]
def fwd(px):
    with torch.inference_mode(), autocast("bf16"):
        return bb(px)
def bare():
    for px in pre: fwd(px)
def seq():
    for s in range(0, 512, B): fwd(prep(s))
def overlapped():
    q = queue.Queue(maxsize=2)
    def producer():
        for s in range(0, 512, B): q.put(prep(s))
        q.put(None)
    th = threading.Thread(target=producer, daemon=True); th.start()
    while (px := q.get()) is not None: fwd(px)
    th.join()
fwd(pre[0])
for rep in range(3):
    for f in (bare, seq, overlapped):
        a = time.perf_counter(); f(); print(f.__name__, f"{512/(time.perf_counter()-a):.1f} img/s")
