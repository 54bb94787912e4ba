import torch, time
torch.manual_seed(0)
W = torch.randn(1536, 576, dtype=torch.bfloat16)
def t(M, reps=3):
    x = torch.randn(M, 576, dtype=torch.bfloat16)
    out = []
    for _ in range(reps):
        a = time.perf_counter(); 
        for _ in range(10): torch.nn.functional.linear(x, W)
        out.append((time.perf_counter() - a) / 10 * 1e3)
    return out
for M in [700, 704, 708, 712, 716, 720, 700, 704]:
    a = time.perf_counter(); x = torch.randn(M, 576, dtype=torch.bfloat16); torch.nn.functional.linear(x, W); first=(time.perf_counter()-a)*1e3
    r = t(M)
    print(M, f"first {first:.2f} ms, then {min(r):.2f} ms  -> {2*M*576*1536/min(r)/1e6:.0f} GFLOP/s")
