import cProfile, pstats, torch
from pathlib import Path
from benchmarks.workspace import Workspace
ws = Workspace(Path("models/base"), images=512)
ws.backbone; ws.dataset
ws.embed(ws.scratch("w"))
pr = cProfile.Profile(); pr.enable()
ws.embed(ws.scratch("e"))
pr.disable()
st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(25)
