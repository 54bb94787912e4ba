"""Run the benchmarks, print their table and write metrics/bench.json (one flat object).

    python -m benchmarks [--models DIR] [--vlm DIR] [--only NAMES] [--quick] [--out FILE]

--quick runs every benchmark at toy sizes (a smoke test of the harness, seconds to a minute each; its ratios
mean little). The full sizes are chosen to give stable ratios within ~15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ("embed", "cache_payoff", "stage2_mfu", "generation", "embed_memory", "incremental", "serving")


@dataclass(frozen=True)
class Sizes:
    images: int          # of the shared synthetic split (embedded once; benchmarks 1-4 use it)
    repeats: int         # side-by-side repetitions of benchmarks 1 and 2 (best of each side)
    qformer_steps: int   # per side and repetition, after one warm-up step
    vlm_steps: int       # after one warm-up step
    generation_images: int
    memory_n: int        # benchmark 5 embeds N and 4N images
    serving_requests: int   # benchmark 7: chat requests per side (one at a time: at most SERVING_TIME_LIMIT_S)
    serving_clients: int
    serving_max_tokens: int


# 512 images: one full shard of the embed stage, so its fixed costs (weights fingerprint, file footers) weigh as
# little as in a real split; 3 repetitions: this VM's speed drifts by tens of percent from run to run.
FULL = Sizes(images=512, repeats=3, qformer_steps=3, vlm_steps=24, generation_images=16, memory_n=64,
             serving_requests=32, serving_clients=16, serving_max_tokens=16)
QUICK = Sizes(images=16, repeats=1, qformer_steps=1, vlm_steps=1, generation_images=2, memory_n=4,
              serving_requests=8, serving_clients=4, serving_max_tokens=4)
SERVING_TIME_LIMIT_S = 60.0  # the one-at-a-time side of benchmark 7 stops sending after this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models" / "base",
                        help="base models folder (vision/, bert/, llm/); made by `dvc repro weights` if missing")
    parser.add_argument("--vlm", type=Path, default=None,
                        help="a train_vlm output for the generation and serving benchmarks (default: models/vlm if "
                             "present, else an untrained model)")
    parser.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the harness, not the design")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "metrics" / "bench.json")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(NAMES)}")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars that the stages' code does not switch off itself
    sizes = QUICK if args.quick else FULL
    vlm_dir = args.vlm
    if vlm_dir is None and (REPO_ROOT / "models" / "vlm" / "vlm_config.json").is_file():
        vlm_dir = REPO_ROOT / "models" / "vlm"

    from benchmarks import cache_payoff, embed_memory, embed_throughput, generation, incremental, serving, stage2_mfu
    from benchmarks.harness import machine, table, write_json
    from benchmarks.workspace import Workspace

    description = machine()
    ws = Workspace(args.models, images=sizes.images)
    runs = {
        "embed": lambda: [embed_throughput.run(ws, sizes.repeats)],
        "cache_payoff": lambda: [cache_payoff.run(ws, sizes.qformer_steps, sizes.repeats)],
        "stage2_mfu": lambda: [stage2_mfu.run(ws, sizes.vlm_steps)],
        "generation": lambda: [generation.run(ws, sizes.generation_images, vlm_dir)],
        "embed_memory": lambda: [embed_memory.run(ws.models / "vision", sizes.memory_n)],
        "incremental": incremental.run,
        "serving": lambda: [serving.run(serving.build_assistant(ws, vlm_dir), sizes.serving_requests,
                                        sizes.serving_clients, sizes.serving_max_tokens, SERVING_TIME_LIMIT_S,
                                        ws.params.data.image_size)],
    }
    figures = []
    started = time.perf_counter()
    try:
        for name in [name for name in NAMES if name in chosen]:
            start = time.perf_counter()
            figures += runs[name]()
            print(f"benchmarks: {name} took {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        ws.close()
    description["bench_s"] = round(time.perf_counter() - started)
    description["sizes"] = "quick" if args.quick else "full"
    print()
    print(table(figures, description))
    write_json(args.out, figures, description)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
