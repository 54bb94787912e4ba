"""Peak memory of the `embed` stage does not grow with the split: embed N and 4N images, compare peak RSS.

    .venv/bin/python benchmarks/embed_memory.py [N]

Each size runs in a fresh interpreter (so one run's peak cannot hide the other's) and reports
resource.getrusage's ru_maxrss. Uses the real backbone at models/base/vision when the weights stage has written
it, else a tiny random DINOv2. A ratio near 1.0 means memory is bounded by a batch, not by the split.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_BACKBONE = REPO_ROOT / "models" / "base" / "vision"
BATCH_SIZE = 32      # params.yaml's backbone.batch_size
SHARD_SIZE = 64      # several shards even at the smaller size, so shard turnover is part of what is measured
DEFAULT_N = 64


def child(dataset: str, out_dir: str, vision: str, image_size: str) -> None:
    """Embed one split and print the peak RSS in MiB (Linux reports ru_maxrss in KiB)."""
    from vlm.data.embed import embed_split
    from vlm.models.backbone import VisionBackbone

    backbone = VisionBackbone.from_folder(Path(vision), image_size=int(image_size))
    summary = embed_split(backbone, Path(dataset), Path(out_dir), batch_size=BATCH_SIZE, precision="fp32",
                          shard_size=SHARD_SIZE)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": summary.images, "peak_rss_mib": peak}))


def tiny_backbone(folder: Path) -> tuple[Path, int]:
    """A random 2-layer DINOv2 (width 32) saved as a Hugging Face folder, with the preprocessor file it needs."""
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=56)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    return folder, 56


def measure(n: int = DEFAULT_N) -> dict[str, float]:
    from vlm.data.dataset_io import write_split
    from vlm.data.synthetic import generate_records

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if (REAL_BACKBONE / "config.json").is_file() or (REAL_BACKBONE / "open_clip.json").is_file():
            vision, image_size, name = REAL_BACKBONE, 224, "models/base/vision"
        else:
            (vision, image_size), name = tiny_backbone(root / "tiny_vision"), "tiny random DINOv2"
        result: dict[str, float] = {"n": n}
        for count in (n, 4 * n):
            dataset = root / f"split-{count}.parquet"
            write_split(generate_records(seed=0, num_images=count, image_size=224, id_prefix="bench"), dataset)
            run = subprocess.run([sys.executable, __file__, "--child", str(dataset), str(root / f"emb-{count}"),
                                  str(vision), str(image_size)], capture_output=True, text=True, check=True)
            report = json.loads(run.stdout.strip().splitlines()[-1])
            assert report["images"] == count, report
            result[f"peak_rss_mib_{count}"] = round(report["peak_rss_mib"], 1)
        result["ratio"] = round(result[f"peak_rss_mib_{4 * n}"] / result[f"peak_rss_mib_{n}"], 3)
    print(f"embed peak RSS with {name} at {image_size} px, batch {BATCH_SIZE}: "
          f"{n} images {result[f'peak_rss_mib_{n}']} MiB, {4 * n} images {result[f'peak_rss_mib_{4 * n}']} MiB, "
          f"ratio {result['ratio']}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        measure(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_N)
