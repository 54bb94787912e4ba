import torch, time
W = torch.randn(1536, 576, dtype=torch.bfloat16)
W2 = torch.randn(576, 1536, dtype=torch.bfloat16)
xs = {M: (torch.randn(M, 576, dtype=torch.bfloat16), torch.randn(M, 1536, dtype=torch.bfloat16)) for M in (704, 712, 720, 736, 768)}
for M,(x,y) in xs.items():
    for _ in range(3): torch.nn.functional.linear(x, W); torch.nn.functional.linear(y, W2)
res = {M: [] for M in xs}
for r in range(30):
    for M,(x,y) in xs.items():
        a = time.perf_counter()
        for _ in range(5): torch.nn.functional.linear(x, W); torch.nn.functional.linear(y, W2)
        res[M].append((time.perf_counter() - a) / 10)
for M, t in res.items():
    t.sort(); med = t[len(t)//2]
    print(M, f"median {med*1e3:.2f} ms  {2*M*576*1536/med/1e9:.0f} GFLOP/s; per real token of 712: {med/712*1e6:.2f} us")
