"""The frozen image encoder: pixels in, one embedding per output token (CLS/prefix tokens + patches) out.

It wraps either a Hugging Face vision model folder (DINOv2, CLIP/SigLIP vision towers, ViT; a full CLIP/SigLIP
folder contributes its vision tower) or an open_clip folder written by `vlm.weights.sources` (`open_clip.json` +
`model.safetensors`). Whatever the family, `forward` returns ALL output tokens, so the Q-Former can attend to the
complete token sequence, and position embeddings are interpolated to the requested `image_size`.

The backbone is frozen: no gradients, and it stays in eval mode even if a parent module calls `.train()`, so
its outputs can be cached once (in Parquet) and reused by every training run.
"""

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import MODEL_MAPPING, AutoConfig, AutoModel

from vlm.config import as_layers, layer_label
from vlm.weights.sources import HF_PREPROCESSOR_CONFIG, OPEN_CLIP_CONFIG, SOURCE_RECORD

# Bicubic with antialiasing, as PIL's BICUBIC resize does it, computed by torch's uint8 kernel: several times faster
# than PIL's, which was a large share of the `embed` stage's time in bf16 (BENCHMARKS.md, benchmark 1).
# Where both sides shrink, or both grow, every pixel is within one grey level of PIL's and nearly all are equal;
# where one shrinks and the other grows, the two passes round in another order and noisy images differ by more.
RESIZE_METHOD = "bicubic-antialias"


def _load_hf_encoder(folder: Path, image_size: int) -> tuple[nn.Module, dict[str, Any], str, tuple, tuple]:
    """Hugging Face vision model + the keyword arguments its forward needs to run at `image_size`."""
    preprocessor = folder / HF_PREPROCESSOR_CONFIG
    settings = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    if "image_mean" not in settings or "image_std" not in settings:
        raise FileNotFoundError(f"{preprocessor} is missing or lacks image_mean/image_std, which are needed to "
                                "normalise pixels. Save the model's image processor into the folder.")
    config = AutoConfig.from_pretrained(folder)
    vision_config = getattr(config, "vision_config", None)
    # A full two-tower folder (CLIPModel, SiglipModel) contributes only its image tower; the text tower's
    # weights are reported as unexpected keys and skipped.
    model_class = MODEL_MAPPING[type(vision_config)] if vision_config is not None else AutoModel
    encoder, loading_info = model_class.from_pretrained(folder, output_loading_info=True)
    if loading_info["missing_keys"]:
        raise ValueError(f"{folder}: weights for {sorted(loading_info['missing_keys'])[:10]} are missing, so "
                         f"{type(encoder).__name__} would be partly random. Is this the right folder?")
    native_size = getattr(encoder.config, "image_size", image_size)
    forward_kwargs: dict[str, Any] = {}
    # DINOv2 always interpolates; CLIP/SigLIP/ViT do it only when asked (and refuse other sizes otherwise).
    if native_size != image_size and "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters:
        forward_kwargs["interpolate_pos_encoding"] = True
    name = f"hf:{type(encoder).__name__}"
    return encoder, forward_kwargs, name, tuple(settings["image_mean"]), tuple(settings["image_std"])


def _load_open_clip_encoder(folder: Path, image_size: int) -> tuple[nn.Module, str, tuple, tuple]:
    """open_clip VisionTransformer rebuilt from its stored config, with position embeddings resized to image_size."""
    from open_clip.model import _build_vision_tower, resize_pos_embed
    from safetensors.torch import load_file

    record = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    model_config = record["model_cfg"]
    vision_config = dict(model_config["vision_cfg"], image_size=image_size)
    # open_clip's public factory needs the model name registered and builds the text tower too; building the
    # vision tower alone from the stored config keeps loading offline and registry-independent.
    encoder = _build_vision_tower(model_config["embed_dim"], vision_config,
                                  quick_gelu=model_config.get("quick_gelu", False))
    state = load_file(str(folder / "model.safetensors"))
    # resize_pos_embed works on full-CLIP state dicts (`visual.*` keys, `model.visual`), hence the wrapping.
    prefixed = {f"visual.{key}": value for key, value in state.items()}
    resize_pos_embed(prefixed, SimpleNamespace(visual=encoder))
    encoder.load_state_dict({key[len("visual."):]: value for key, value in prefixed.items()})
    pretrained = record.get("pretrained")
    name = f"open_clip:{record['model']}" + (f"/{pretrained}" if pretrained else "")
    return encoder, name, tuple(record["image_mean"]), tuple(record["image_std"])


def _drop_blocks_after(encoder: nn.Module, keep: int, blocks: int) -> None:
    """Delete a HF encoder's blocks after the first `keep`: their outputs are never read, and they would cost a
    third of the embedding time with the default `backbone.layer` (blocks 4 and 8 of 12). Models that keep their
    blocks elsewhere than in a `layer`/`layers` list stay whole (slower, same tokens)."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers") and len(module) == blocks:
            del module[keep:]
            return


def _num_blocks(encoder: nn.Module, kind: str) -> int:
    """Transformer blocks of the encoder (the choices for `layer`)."""
    if kind == "open_clip":
        return len(encoder.transformer.resblocks)
    return int(encoder.config.num_hidden_layers)


class VisionBackbone(nn.Module):
    """Frozen image encoder returning every output token: `forward(pixels [B,3,S,S]) -> [B, T, D]`."""

    def __init__(self, encoder: nn.Module, *, kind: str, name: str, source: str, image_size: int,
                 image_mean: tuple[float, ...], image_std: tuple[float, ...],
                 forward_kwargs: dict[str, Any] | None = None, layer: int | Sequence[int] = -1) -> None:
        super().__init__()
        if kind not in ("hf", "open_clip"):
            raise ValueError(f"Unknown backbone kind '{kind}'; expected 'hf' or 'open_clip'.")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean/image_std must have 3 values (RGB), got {image_mean} / {image_std}.")
        self.encoder = encoder.eval().requires_grad_(False)
        self.kind = kind
        self.name = name
        self.source = source
        self.image_size = image_size
        self.image_mean = tuple(float(value) for value in image_mean)
        self.image_std = tuple(float(value) for value in image_std)
        self._forward_kwargs = forward_kwargs or {}
        blocks = _num_blocks(encoder, kind)
        self.layer = layer if isinstance(layer, int) else tuple(layer)
        if not self.layers or not all(-blocks <= index <= -1 for index in self.layers):
            raise ValueError(f"backbone.layer must be between -{blocks} and -1 for {name} ({blocks} blocks; -1 = "
                             f"the last block, -2 the one before, ...), or a list of such blocks, got {layer}")
        self._blocks = blocks
        if kind == "hf":
            _drop_blocks_after(encoder, blocks + 1 + max(self.layers), blocks)
        # One dummy forward tells token count and width for every model family, and fails here, early, if the
        # model cannot run at this resolution.
        try:
            probe = self(torch.zeros(1, 3, image_size, image_size))
        except Exception as error:
            raise ValueError(f"Backbone {name} from {source} cannot encode {image_size}x{image_size} images: "
                             f"{error}") from error
        self._num_tokens, self._hidden_size = probe.shape[1], probe.shape[2]
        self.eval()

    @classmethod
    def from_folder(cls, path: Path, image_size: int, layer: int | Sequence[int] = -1) -> "VisionBackbone":
        """Load a folder written by `vlm.weights.sources.materialise` (or any HF vision model folder); `layer`
        picks the block (or blocks) whose tokens `forward` returns (see `forward`)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"Vision backbone folder not found: {folder}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        record_path = folder / SOURCE_RECORD
        source = json.loads(record_path.read_text())["source"] if record_path.is_file() else str(folder)
        if (folder / OPEN_CLIP_CONFIG).is_file():
            encoder, name, mean, std = _load_open_clip_encoder(folder, image_size)
            return cls(encoder, kind="open_clip", name=name, source=source, image_size=image_size,
                       image_mean=mean, image_std=std, layer=layer)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has neither config.json (Hugging Face) nor {OPEN_CLIP_CONFIG} "
                                    "(open_clip); create it with the `weights` stage (vlm.weights.sources).")
        encoder, forward_kwargs, name, mean, std = _load_hf_encoder(folder, image_size)
        return cls(encoder, kind="hf", name=name, source=source, image_size=image_size,
                   image_mean=mean, image_std=std, forward_kwargs=forward_kwargs, layer=layer)

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks whose tokens `forward` returns, concatenated in this order."""
        return as_layers(self.layer)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def num_tokens(self) -> int:
        """Output tokens per image at `image_size` (prefix tokens such as CLS, plus one per patch)."""
        return self._num_tokens

    def train(self, mode: bool = True) -> "VisionBackbone":
        """Ignore requests for training mode: a frozen backbone must behave identically every time."""
        return super().train(False)

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """RGB, squash-resize to image_size x image_size (RESIZE_METHOD), scale to [0, 1], normalise by mean/std."""
        if not images:
            raise ValueError("preprocess() needs at least one image.")
        size = (self.image_size, self.image_size)
        pixels = torch.empty(len(images), 3, *size, dtype=torch.uint8)
        for row, image in enumerate(images):
            # convert() copies even an RGB image. HWC viewed as CHW is channels-last, what the uint8 kernel takes.
            rgb = torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB"))).permute(2, 0, 1)
            if rgb.shape[1:] != size:
                rgb = F.interpolate(rgb[None], size=size, mode="bicubic", antialias=True)[0]
            pixels[row] = rgb
        # In-place arithmetic skips two batch-sized temporaries (same values).
        batch = pixels.float().div_(255.0)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return batch.sub_(mean).div_(std)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, S, S] normalised pixels -> [B, T, D] token embeddings (prefix tokens first, then patches).

        The tokens are block `self.layer`'s output (-1: the last block), normalised the way the model normalises
        its last block's output (DINOv2/ViT `layernorm`, open_clip `ln_post`; CLIP's HF towers have none), as
        DINOv2's `get_intermediate_layers(norm=True)` does. With several blocks, their tokens are concatenated
        along the width ([B, T, D * blocks]): a middle block still knows colors that the last has learnt to
        ignore, while the later one knows shapes better (docs/experiments/backbone-layer.md). The pixels move to the
        backbone's device (`preprocess` makes them on the CPU), so callers need not."""
        pixel_values = pixel_values.to(next(self.parameters()).device)
        if self.kind == "open_clip":
            out = self.encoder.forward_intermediates(pixel_values, indices=[self._blocks + i for i in self.layers],
                                                     stop_early=True, normalize_intermediates=True,
                                                     intermediates_only=True,
                                                     output_fmt="NLC", output_extra_tokens=True)
            return torch.cat([torch.cat([prefix, patches], dim=1) for prefix, patches
                              in zip(out["image_intermediates_prefix"], out["image_intermediates"])], dim=-1)
        if self.layers == (-1,):
            return self.encoder(pixel_values=pixel_values, **self._forward_kwargs).last_hidden_state
        out = self.encoder(pixel_values=pixel_values, output_hidden_states=True, **self._forward_kwargs)
        final_norm = getattr(self.encoder, "layernorm", None) or nn.Identity()
        # hidden_states[0] is the patch embedding, [k] block k's output (counted from the front: later blocks
        # may have been dropped, see `_drop_blocks_after`)
        return torch.cat([final_norm(out.hidden_states[self._blocks + 1 + index]) for index in self.layers], dim=-1)

    def metadata(self) -> dict[str, str]:
        """Everything needed to interpret (and reproduce) cached embeddings, as strings for Parquet metadata."""
        return {
            "backbone_name": self.name,
            "backbone_source": self.source,
            "hidden_size": str(self.hidden_size),
            "num_tokens": str(self.num_tokens),
            "image_size": str(self.image_size),
            "layer": layer_label(self.layer),
            "image_mean": json.dumps(list(self.image_mean)),
            "image_std": json.dumps(list(self.image_std)),
            "resize": RESIZE_METHOD,
        }
