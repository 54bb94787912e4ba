"""Export a trained model as one shareable folder, and load it back (`vlm.load`).

The folder holds everything needed to go from a raw image to text, and nothing that points outside it:

    README.md                model card: parts, prompts, evaluation metrics, usage
    export_config.json       backbone image size, prompts, decoding settings, provenance
    vision/                  the frozen backbone, as the `weights` stage wrote it (safetensors + config +
                             preprocessor_config.json with the normalisation)
    qformer/                 Q-Former weights, config and tokenizer
    projector.safetensors    the MLP projector
    vlm_config.json          projector shape, system prompt, whether the LoRA is merged
    llm/                     merged: the LLM with the LoRA folded into its weights (plain safetensors + config +
                             tokenizer); --no-merge: the base LLM folder, unchanged ...
    adapter/                 ... and beside it the LoRA adapter in peft format (only with --no-merge)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from vlm.artifacts import BASE_MODELS_DIR, VLM_DIR, atomic_directory
from vlm.assistant import Assistant
from vlm.config import EvalConfig, LLMConfig, Params, build
from vlm.models.backbone import RESIZE_METHOD, VisionBackbone
from vlm.models.vlm import VisionLanguageModel
from vlm.weights.sources import SOURCE_RECORD

EXPORT_CONFIG = "export_config.json"
FORMAT_VERSION = 1
VISION_SUBDIR = "vision"
DECODING_KEYS = ("max_new_tokens", "max_answer_tokens", "num_beams")


def export(out_dir: Path, params: Params, merge: bool = True, model_dir: Path = VLM_DIR,
           vision_dir: Path = BASE_MODELS_DIR / "vision", metrics: dict[str, Any] | None = None) -> Path:
    """Write the model trained in `model_dir` (with the backbone in `vision_dir` and the prompts, image size and
    decoding of `params`) into `out_dir`, atomically. `merge`: fold the LoRA into the LLM's weights; else keep the
    base LLM and the adapter. `metrics` (flat, e.g. metrics/eval.json) go into the model card."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / EXPORT_CONFIG).is_file():
        raise FileExistsError(f"{out_dir} exists and is not an exported model; choose a new folder")
    # Loaded to check it runs at the trained size, and to record how it preprocesses images.
    backbone = VisionBackbone.from_folder(vision_dir, params.backbone.image_size, params.backbone.layer)
    model = VisionLanguageModel.load(model_dir)
    if merge:
        model.merge_lora()
    config = {
        "format_version": FORMAT_VERSION,
        "backbone": {"folder": VISION_SUBDIR, "image_size": backbone.image_size, "layer": backbone.layer,
                     "resize": RESIZE_METHOD,
                     "image_mean": list(backbone.image_mean), "image_std": list(backbone.image_std),
                     "name": backbone.name, "source": backbone.source, "num_tokens": backbone.num_tokens},
        "llm": {"source": params.llm.source, "system_prompt": model.prompt.system_prompt,
                "caption_prompt": params.llm.caption_prompt, "question_suffix": params.llm.question_suffix},
        "decoding": {key: getattr(params.eval, key) for key in DECODING_KEYS},
        "qformer_bert": params.qformer.bert,
        "lora": "merged" if merge else "adapter",
    }
    provenance = {"vision": _read_json(Path(vision_dir) / SOURCE_RECORD),
                  "llm": _read_json(Path(model.llm_source) / SOURCE_RECORD)}
    with atomic_directory(out_dir) as tmp:
        model.write(tmp, include_llm=True)
        shutil.copytree(vision_dir, tmp / VISION_SUBDIR)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(out_dir.name, config, model, provenance, metrics or {}))
        for path in tmp.rglob("*"):  # some writers make owner-only files; the folder is meant to be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
    return out_dir


def load(folder: Path | str) -> Assistant:
    """Load a folder written by `vlm export`: an `Assistant` whose `caption(image)` and `ask(image, question)`
    take PIL images. Needs nothing outside the folder (and no network)."""
    folder = Path(folder)
    config_path = folder / EXPORT_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {folder} a folder written by `vlm export`?")
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: export format {config.get('format_version')!r}, this version of vlm "
                         f"reads format {FORMAT_VERSION}")
    backbone = VisionBackbone.from_folder(folder / config["backbone"]["folder"], config["backbone"]["image_size"],
                                         config["backbone"].get("layer", -1))
    model = VisionLanguageModel.load(folder)
    llm = build(LLMConfig, config["llm"], prefix="llm.")
    decoding = build(EvalConfig, config["decoding"], prefix="decoding.")
    return Assistant(backbone, model, llm, decoding)


def model_card(name: str, config: dict[str, Any], model: VisionLanguageModel, provenance: dict[str, dict],
               metrics: dict[str, Any]) -> str:
    """README.md of an exported folder: what is in it, how it was prompted and scored, how to use it.
    `provenance`: the `weights` stage's source records of the backbone and the base LLM ({} if unknown)."""
    qformer, projector = model.qformer.config, model.projector.config()
    backbone, llm, decoding = config["backbone"], config["llm"], config["decoding"]
    lora = ("LoRA merged into its weights" if config["lora"] == "merged"
            else "unchanged; the LoRA adapter (peft format) is in `adapter/`")
    visual_block = f"{qformer.num_queries} visual tokens"
    if model.cell_labels:
        visual_block += f", each grid cell's name in words before its own ({model.num_visual_tokens} tokens in all)"
    if model.empty_cells is not None:
        visual_block += "; the cells whose tokens all name 'none' are left out, label and tokens"
    lines = [
        f"# {name}",
        "",
        "A BLIP-2-style vision-language model: a frozen image backbone, a Q-Former whose learned queries read the",
        "image, an MLP projector, and a small LLM adapted with LoRA. It captions images and answers questions.",
        "",
        "## Parts",
        "",
        "| part | where | what |",
        "|---|---|---|",
        f"| image backbone (frozen) | `{backbone['folder']}/` | {backbone['name']}, "
        f"{_described(provenance.get('vision', {}), backbone['source'])}; images squash-resized to "
        f"{backbone['image_size']}x{backbone['image_size']} px ({backbone['resize']}), scaled to [0, 1], normalised "
        f"with mean {backbone['image_mean']} and std {backbone['image_std']}; {backbone['num_tokens']} tokens of block "
        f"{backbone.get('layer', -1)} (-1 = the last) |",
        f"| Q-Former | `qformer/` | {qformer.num_layers} layers, width {qformer.hidden_size}, "
        f"{qformer.num_queries} queries, cross-attention every {qformer.cross_attention_freq} layer(s); "
        f"initialised from the BERT of `qformer.bert: {config['qformer_bert']}` |",
        f"| projector | `projector.safetensors` | MLP {projector['in_dim']} -> {projector['hidden_dim']} -> "
        f"{projector['out_dim']} |",
        f"| LLM | `llm/` | {_described(provenance.get('llm', {}), llm['source'])}; {lora} |",
        "",
        "## Prompt",
        "",
        "The LLM's own chat template, with the image's query tokens between the system turn and the user turn:",
        "",
        "```",
        f"[system turn: {llm['system_prompt']}] [{visual_block}] [user turn: instruction] [assistant turn: answer]",
        "```",
        "",
        f"Captions are asked with `{llm['caption_prompt']}`; questions get the suffix `{llm['question_suffix']}`. "
        f"Decoding: {'greedy' if decoding['num_beams'] == 1 else str(decoding['num_beams']) + ' beams'}, at most "
        f"{decoding['max_new_tokens']} tokens for a caption and {decoding['max_answer_tokens']} for an answer.",
        "",
        "## Evaluation",
        "",
    ]
    numbers = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    if numbers:
        lines += ["On the test split of the pipeline that trained it (`metrics/eval.json`). `blind_*` is the same",
                  "model with a blank image in place of every image, `visual_gain_*` the difference (seeing - blind).",
                  "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in numbers.items()]
    else:
        lines += ["No evaluation metrics were given at export."]
    lines += [
        "",
        "## Usage",
        "",
        "With the `vlm` package installed (it defines the model; nothing is fetched from the network):",
        "",
        "```python",
        "import vlm",
        "from PIL import Image",
        "",
        f'model = vlm.load("{name}")',
        'image = Image.open("photo.png")',
        "print(model.caption(image))",
        'print(model.ask(image, "how many objects are there?"))',
        'print(model.chat([{"role": "user", "content": [{"type": "image", "image": image},',
        '                                               {"type": "text", "text": "what is in the image?"}]}]))',
        "```",
        "",
        f"or from the shell: `vlm caption photo.png --model {name}`, `vlm chat photo.png --model {name}`.",
        "",
    ]
    return "\n".join(lines)


def _described(record: dict[str, Any], source: str) -> str:
    """Where the `weights` stage took a base model from, as its source record tells."""
    kind, origin = record.get("model_type"), record.get("origin")
    return (f"{kind + ' ' if kind else ''}from source `{source}`"
            + (f" (`{origin}`)" if origin and origin != source else ""))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
