import torch, time
L = 30
Ws = [torch.randn(1536, 576, dtype=torch.bfloat16) for _ in range(L)]
x = torch.randn(712, 576, dtype=torch.bfloat16)
xs = [torch.randn(712, 576, dtype=torch.bfloat16) for _ in range(L)]
def hot():
    for i in range(L): torch.nn.functional.linear(x, Ws[0])
def cold():
    for i in range(L): torch.nn.functional.linear(xs[i], Ws[i])
def cold3d():
    for i in range(L): torch.nn.functional.linear(xs[i].view(4, 178, 576), Ws[i])
for f in (hot, cold, cold3d): f()
res = {f.__name__: [] for f in (hot, cold, cold3d)}
for r in range(10):
    for f in (hot, cold, cold3d):
        a = time.perf_counter(); f(); res[f.__name__].append((time.perf_counter() - a) / L)
for k, t in res.items():
    t.sort(); med = t[len(t)//2]; print(k, f"{med*1e3:.2f} ms {2*712*576*1536/med/1e9:.0f} GFLOP/s")
