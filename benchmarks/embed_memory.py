"""Peak memory of the `embed` stage does not grow with the split: embed N and 4N images, compare peak RSS.

    .venv/bin/python -m benchmarks.embed_memory [N]     # or as part of `make bench` (benchmark 5)

Each size runs in a fresh interpreter (so one run's peak cannot hide the other's) and reports its peak RSS
(VmHWM: see harness.peak_rss_mib for why not ru_maxrss), and how far the peak rose above the RSS it had once
the backbone was loaded (the part that would grow if embedding held on to images or outputs). Uses the real backbone at models/base/vision (or the folder given) when the
weights stage has written it, else a tiny random DINOv2. A ratio near 1.0 means memory is bounded by a batch,
not by the split. Goal <= 1.2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Figure, peak_rss_mib, ratio, rss_mib

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_BACKBONE = REPO_ROOT / "models" / "base" / "vision"
BATCH_SIZE = 32      # params.yaml's backbone.batch_size
SHARD_SIZE = 64      # several shards even at the smaller size, so shard turnover is part of what is measured
DEFAULT_N = 64


def child(dataset: str, out_dir: str, vision: str, image_size: str) -> None:
    """Embed one split and print the peak RSS in MiB (Linux reports ru_maxrss in KiB)."""
    from vlm.embed import embed_split
    from vlm.models.backbone import VisionBackbone

    backbone = VisionBackbone.from_folder(Path(vision), image_size=int(image_size))
    loaded = rss_mib()
    summary = embed_split(backbone, Path(dataset), Path(out_dir), batch_size=BATCH_SIZE, precision="fp32",
                          shard_size=SHARD_SIZE)
    print(json.dumps({"images": summary.images, "peak_rss_mib": peak_rss_mib(), "loaded_rss_mib": loaded}))


def tiny_backbone(folder: Path) -> tuple[Path, int]:
    """A random 2-layer DINOv2 (width 32) saved as a Hugging Face folder, with the preprocessor file it needs."""
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=56)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    return folder, 56


def measure(n: int = DEFAULT_N, real_backbone: Path = REAL_BACKBONE) -> dict[str, float]:
    from vlm.data.dataset_io import write_split
    from vlm.data.synthetic import generate_records

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if (real_backbone / "config.json").is_file() or (real_backbone / "open_clip.json").is_file():
            vision, image_size, name = real_backbone, 224, str(real_backbone)
        else:
            (vision, image_size), name = tiny_backbone(root / "tiny_vision"), "tiny random DINOv2"
        result: dict[str, float] = {"n": n}
        for count in (n, 4 * n):
            dataset = root / f"split-{count}.parquet"
            write_split(generate_records(seed=0, num_images=count, image_size=224, id_prefix="bench"), dataset)
            run = subprocess.run([sys.executable, "-m", "benchmarks.embed_memory", "--child", str(dataset),
                                  str(root / f"emb-{count}"), str(vision), str(image_size)], cwd=REPO_ROOT,
                                 capture_output=True, text=True, check=True)
            report = json.loads(run.stdout.strip().splitlines()[-1])
            assert report["images"] == count, report
            result[f"peak_rss_mib_{count}"] = round(report["peak_rss_mib"], 1)
            result[f"rise_mib_{count}"] = round(report["peak_rss_mib"] - report["loaded_rss_mib"], 1)
        result["ratio"] = round(ratio(result[f"peak_rss_mib_{4 * n}"], result[f"peak_rss_mib_{n}"]), 3)
        result["image_size"] = image_size
    print(f"embed peak RSS with {name} at {image_size} px, batch {BATCH_SIZE}: "
          f"{n} images {result[f'peak_rss_mib_{n}']} MiB, {4 * n} images {result[f'peak_rss_mib_{4 * n}']} MiB, "
          f"ratio {result['ratio']}; rise above the loaded backbone {result[f'rise_mib_{n}']} and "
          f"{result[f'rise_mib_{4 * n}']} MiB")
    return result


def run(real_backbone: Path, n: int = DEFAULT_N) -> Figure:
    result = measure(n, real_backbone)
    small, large = result[f"peak_rss_mib_{n}"], result[f"peak_rss_mib_{4 * n}"]
    return Figure(key="embed_memory", title="5 embed peak RSS: 4N images / N images", value=result["ratio"],
                  goal="<= 1.2", details={"n": n, "image_size": result["image_size"], "batch_size": BATCH_SIZE,
                                           "peak_rss_mib_n": small, "peak_rss_mib_4n": large,
                                           "rise_mib_n": result[f"rise_mib_{n}"],
                                           "rise_mib_4n": result[f"rise_mib_{4 * n}"]},
                  note=f"{large:.0f} vs {small:.0f} MiB ({4 * n} vs {n} images at {result['image_size']} px; "
                       f"rise above loaded model {result[f'rise_mib_{4 * n}']:.0f} vs {result[f'rise_mib_{n}']:.0f})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        measure(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_N)
