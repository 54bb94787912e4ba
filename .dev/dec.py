import time, io, torch, numpy as np
from PIL import Image
from pathlib import Path
import pyarrow.parquet as pq
import torchvision
from torchvision.io import decode_png, decode_image, ImageReadMode
t = pq.read_table("data/dataset/test.parquet", columns=["image"])
datas = t.column("image").to_pylist()[:200]
for r in range(3):
    a = time.perf_counter()
    for d in datas:
        im = Image.open(io.BytesIO(d)); im.load(); x = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    b = time.perf_counter()
    for d in datas:
        y = decode_image(torch.frombuffer(d, dtype=torch.uint8), mode=ImageReadMode.RGB)
    c = time.perf_counter()
    print(f"PIL {(b-a)/len(datas)*1e3:.3f} ms  torchvision {(c-b)/len(datas)*1e3:.3f} ms  equal {torch.equal(x, y)}")
