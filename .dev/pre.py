import time, numpy as np, torch
from pathlib import Path
from PIL import Image
from benchmarks.workspace import Workspace
from vlm.data.dataset_io import decode_image, read_split
ws = Workspace(Path("models/base"), images=256)
bb = ws.backbone
t = read_split(ws.dataset, columns=["image_id", "image"])
ims = [decode_image(x, i) for x, i in zip(t.column("image").to_pylist(), t.column("image_id").to_pylist())]
print(ims[0].size, ims[0].mode)
for rep in range(3):
    a = time.perf_counter(); r = [im.resize((112,112), Image.Resampling.BICUBIC) for im in ims]; b = time.perf_counter()
    px = np.stack([np.asarray(x) for x in r]); c = time.perf_counter()
    bt = torch.from_numpy(px).permute(0,3,1,2).float().div_(255.0); m = torch.tensor(bb.image_mean).view(1,3,1,1); s = torch.tensor(bb.image_std).view(1,3,1,1); bt.sub_(m).div_(s); d = time.perf_counter()
    a2 = time.perf_counter(); r2 = [im.resize((112,112), Image.Resampling.BICUBIC, reducing_gap=2.0) for im in ims]; e = time.perf_counter()
    x = torch.from_numpy(np.stack([np.asarray(i) for i in ims])).permute(0,3,1,2)
    f0 = time.perf_counter(); y = torch.nn.functional.interpolate(x, size=(112,112), mode="bicubic", antialias=True); f1 = time.perf_counter()
    diff = (y.permute(0,2,3,1).numpy().astype(int) - px.astype(int))
    print(f"resize {(b-a)/256*1e3:.3f} stack {(c-b)/256*1e3:.3f} norm {(d-c)/256*1e3:.3f} reducing_gap {(e-a2)/256*1e3:.3f} torch-u8 {(f1-f0)/256*1e3:.3f} ms/img; torch vs PIL max diff {np.abs(diff).max()} mean {np.abs(diff).mean():.4f}")
