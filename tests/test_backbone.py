"""VisionBackbone and weight materialisation with tiny random models (no downloads)."""

import json
from pathlib import Path

import open_clip
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          PreTrainedModel)

import vlm.weights.sources as sources
from vlm.models.backbone import VisionBackbone
from vlm.weights.sources import materialise

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
PATCH, NATIVE_SIZE, WIDTH = 8, 32, 32
TINY_VIT = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                patch_size=PATCH, image_size=NATIVE_SIZE)


def _tiny_dinov2() -> Dinov2Model:
    return Dinov2Model(Dinov2Config(**{k: v for k, v in TINY_VIT.items() if k != "intermediate_size"}))


def _tiny_clip_vision() -> CLIPVisionModel:
    return CLIPVisionModel(CLIPVisionConfig(**TINY_VIT))


def _save_hf_folder(model: PreTrainedModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return folder


def _tokens_for(size: int) -> int:
    return (size // PATCH) ** 2 + 1  # CLS + patches


@pytest.mark.parametrize("make_model", [_tiny_dinov2, _tiny_clip_vision], ids=["dinov2", "clip_vision"])
def test_local_hf_folder_round_trip(make_model, tmp_path: Path) -> None:
    model = make_model().eval()
    source = _save_hf_folder(model, tmp_path / "source")
    description = materialise("vision", str(source), tmp_path / "vision")
    assert description["kind"] == "local" and description["hidden_size"] == WIDTH

    backbone = VisionBackbone.from_folder(tmp_path / "vision", image_size=NATIVE_SIZE)
    pixels = torch.randn(2, 3, NATIVE_SIZE, NATIVE_SIZE)
    tokens = backbone(pixels)
    assert tokens.shape == (2, _tokens_for(NATIVE_SIZE), WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(tokens, model(pixel_values=pixels).last_hidden_state)  # same weights, all tokens

    metadata = backbone.metadata()
    assert metadata["backbone_name"] == f"hf:{type(model).__name__}"
    assert metadata["backbone_source"] == str(source)
    assert (metadata["hidden_size"], metadata["num_tokens"], metadata["image_size"]) == (
        str(WIDTH), str(_tokens_for(NATIVE_SIZE)), str(NATIVE_SIZE))
    assert json.loads(metadata["image_mean"]) == MEAN and json.loads(metadata["image_std"]) == STD
    assert metadata["resize"] == "bicubic-antialias"


@pytest.mark.parametrize("make_model", [_tiny_dinov2, _tiny_clip_vision], ids=["dinov2", "clip_vision"])
def test_position_embeddings_are_interpolated_to_image_size(make_model, tmp_path: Path) -> None:
    folder = _save_hf_folder(make_model(), tmp_path / "vision")
    backbone = VisionBackbone.from_folder(folder, image_size=48)
    assert backbone.num_tokens == _tokens_for(48) and backbone.hidden_size == WIDTH
    assert backbone(torch.randn(1, 3, 48, 48)).shape == (1, _tokens_for(48), WIDTH)


def test_full_clip_folder_contributes_its_vision_tower(tmp_path: Path) -> None:
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(vision_config=TINY_VIT, text_config=text, projection_dim=16)).eval()
    folder = _save_hf_folder(model, tmp_path / "clip")
    assert materialise("vision", str(folder), tmp_path / "vision")["model_type"] == "clip_vision_model"

    backbone = VisionBackbone.from_folder(tmp_path / "vision", image_size=NATIVE_SIZE)
    pixels = torch.randn(1, 3, NATIVE_SIZE, NATIVE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixels), model.vision_model(pixel_values=pixels).last_hidden_state)


@pytest.fixture(scope="module")
def tiny_open_clip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a tiny open_clip architecture (open_clip's own model-config mechanism)."""
    name = "vlm-test-tiny-vit"
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": NATIVE_SIZE, "layers": 2, "width": WIDTH, "patch_size": PATCH,
                             "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name


def test_open_clip_tower_returns_cls_and_patch_tokens_after_ln_post(tiny_open_clip_name: str,
                                                                     tmp_path: Path) -> None:
    description = materialise("vision", f"open_clip:{tiny_open_clip_name}", tmp_path / "vision")
    assert description["kind"] == "open_clip" and description["hidden_size"] == WIDTH
    assert description["pretrained"] is None
    backbone = VisionBackbone.from_folder(tmp_path / "vision", image_size=NATIVE_SIZE)

    # Reference: the same weights in open_clip's own tower, asked for its (ln_post-normalised) tokens.
    reference = open_clip.create_model(tiny_open_clip_name).visual.eval()
    reference.load_state_dict(backbone.encoder.state_dict())
    reference.output_tokens = True
    pixels = torch.randn(2, 3, NATIVE_SIZE, NATIVE_SIZE)
    tokens = backbone(pixels)
    with torch.no_grad():
        _, patch_tokens = reference(pixels)
        class_token = reference.ln_post(reference.transformer(reference._embeds(pixels)))[:, :1]
    assert tokens.shape == (2, _tokens_for(NATIVE_SIZE), WIDTH)
    torch.testing.assert_close(tokens[:, 1:], patch_tokens)
    torch.testing.assert_close(tokens[:, :1], class_token)

    metadata = backbone.metadata()
    assert metadata["backbone_name"] == f"open_clip:{tiny_open_clip_name}"
    assert json.loads(metadata["image_mean"]) == list(open_clip.OPENAI_DATASET_MEAN)


def test_open_clip_folder_loads_at_other_sizes_without_registry(tiny_open_clip_name: str, tmp_path: Path) -> None:
    materialise("vision", f"open_clip:{tiny_open_clip_name}", tmp_path / "vision")
    stored = json.loads((tmp_path / "vision" / "open_clip.json").read_text())
    assert stored["model_cfg"]["vision_cfg"]["width"] == WIDTH  # architecture travels with the folder
    backbone = VisionBackbone.from_folder(tmp_path / "vision", image_size=48)
    assert backbone.num_tokens == _tokens_for(48)
    assert backbone(torch.randn(1, 3, 48, 48)).shape == (1, _tokens_for(48), WIDTH)


def test_preprocess_resizes_and_normalises(tmp_path: Path) -> None:
    backbone = VisionBackbone.from_folder(_save_hf_folder(_tiny_dinov2(), tmp_path / "vision"), image_size=40)
    color = (255, 51, 0)
    images = [Image.new("RGB", (70, 20), color), Image.new("L", (5, 9), 102)]  # any size, grey converts to RGB
    pixels = backbone.preprocess(images)
    assert pixels.shape == (2, 3, 40, 40) and pixels.dtype == torch.float32
    for channel in range(3):
        expected_rgb = (color[channel] / 255 - MEAN[channel]) / STD[channel]
        expected_grey = (102 / 255 - MEAN[channel]) / STD[channel]
        torch.testing.assert_close(pixels[0, channel], torch.full((40, 40), expected_rgb))
        torch.testing.assert_close(pixels[1, channel], torch.full((40, 40), expected_grey))
    with pytest.raises(ValueError, match="at least one image"):
        backbone.preprocess([])


@pytest.mark.parametrize("size", [(224, 224), (640, 480), (23, 31), (40, 40)])  # down, down (aspect), up, same
def test_preprocess_resizes_like_pil_bicubic(tmp_path: Path, size: tuple[int, int]) -> None:
    """RESIZE_METHOD is PIL's bicubic filter (antialiased when shrinking) computed by torch: every pixel within one
    grey level of PIL's, so embeddings made here match a PIL pipeline's."""
    backbone = VisionBackbone.from_folder(_save_hf_folder(_tiny_dinov2(), tmp_path / "vision"), image_size=40)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = np.asarray(image.resize((40, 40), Image.Resampling.BICUBIC)).astype(np.float32)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    levels = (backbone.preprocess([image])[0] * std + mean) * 255  # back to 0..255
    difference = (levels - torch.from_numpy(expected).permute(2, 0, 1)).abs()
    assert difference.max() < 1.01
    assert (difference > 0.5).float().mean() < 0.01  # nearly all equal


def test_backbone_is_frozen_and_stays_in_eval_mode(tmp_path: Path) -> None:
    backbone = VisionBackbone.from_folder(_save_hf_folder(_tiny_dinov2(), tmp_path / "vision"), image_size=32)
    parent = torch.nn.Sequential(backbone)
    parent.train()
    assert not backbone.training and not any(module.training for module in backbone.modules())
    assert not any(parameter.requires_grad for parameter in backbone.parameters())


def test_unknown_source_is_rejected_with_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        materialise("vision", "not a valid source!", tmp_path / "vision")
    message = str(error.value)
    assert "not a valid source!" in message
    assert all(form in message for form in ('"bundled"', "local folder", "Hugging Face Hub id", "open_clip:"))
    assert list(tmp_path.iterdir()) == []  # nothing published, no staging folder left behind


def test_open_clip_source_only_for_vision(tiny_open_clip_name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only for the vision component"):
        materialise("llm", f"open_clip:{tiny_open_clip_name}", tmp_path / "llm")


def test_vision_folder_without_normalisation_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "source"
    _tiny_dinov2().save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="image_mean/image_std"):
        materialise("vision", str(folder), tmp_path / "vision")


def test_failed_materialise_keeps_previous_output(tmp_path: Path) -> None:
    source = _save_hf_folder(_tiny_dinov2(), tmp_path / "source")
    out = tmp_path / "out" / "vision"
    materialise("vision", str(source), out)
    before = sorted(path.name for path in out.iterdir())
    (source / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        materialise("vision", str(source), out)
    assert sorted(path.name for path in out.iterdir()) == before
    assert [path.name for path in out.parent.iterdir()] == ["vision"]


def test_hub_id_is_downloaded_then_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub path, with snapshot_download replaced by a local copy (tests never touch the network)."""
    source = _save_hf_folder(_tiny_dinov2(), tmp_path / "hub_repo")
    requested = {}

    def fake_snapshot_download(repo_id: str, local_dir: Path, allow_patterns: list[str]) -> str:
        requested.update(repo_id=repo_id, patterns=allow_patterns)
        sources._copy_folder(source, Path(local_dir))
        return str(local_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    description = materialise("vision", "some-org/tiny-dinov2", tmp_path / "vision")
    assert requested["repo_id"] == "some-org/tiny-dinov2" and "*.safetensors" in requested["patterns"]
    assert description["kind"] == "hub" and description["model_type"] == "dinov2"
    backbone = VisionBackbone.from_folder(tmp_path / "vision", image_size=NATIVE_SIZE)
    assert backbone.metadata()["backbone_source"] == "some-org/tiny-dinov2"


def test_layer_picks_an_earlier_block_normalised_like_the_last(tmp_path: Path) -> None:
    """DINOv2: layer -1 is last_hidden_state; layer -2 is the first block's output through the final LayerNorm."""
    model = _tiny_dinov2().eval()
    folder = _save_hf_folder(model, tmp_path / "vision")
    pixels = torch.randn(2, 3, NATIVE_SIZE, NATIVE_SIZE)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    last = VisionBackbone.from_folder(folder, image_size=NATIVE_SIZE)
    earlier = VisionBackbone.from_folder(folder, image_size=NATIVE_SIZE, layer=-2)
    torch.testing.assert_close(last(pixels), out.last_hidden_state)
    torch.testing.assert_close(earlier(pixels), model.layernorm(out.hidden_states[1]))
    assert not torch.allclose(earlier(pixels), last(pixels))
    assert (last.metadata()["layer"], earlier.metadata()["layer"]) == ("-1", "-2")
    with pytest.raises(ValueError, match=r"backbone.layer must be between -2 and -1"):
        VisionBackbone.from_folder(folder, image_size=NATIVE_SIZE, layer=-3)


@pytest.mark.parametrize("model_class, config_class", [(Dinov2Model, Dinov2Config), (CLIPVisionModel, CLIPVisionConfig)],
                         ids=["dinov2", "clip_vision"])
def test_blocks_after_the_deepest_chosen_layer_are_dropped_and_tokens_unchanged(model_class, config_class,
                                                                                 tmp_path: Path) -> None:
    model = model_class(config_class(**(TINY_VIT | {"num_hidden_layers": 4}))).eval()
    folder = _save_hf_folder(model, tmp_path / "vision")
    pixels = torch.randn(2, 3, NATIVE_SIZE, NATIVE_SIZE)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states  # [0] embeddings, [k] block k
    norm = getattr(model, "layernorm", None) or torch.nn.Identity()
    backbone = VisionBackbone.from_folder(folder, image_size=NATIVE_SIZE, layer=[-4, -3])  # blocks 1 and 2 of 4
    torch.testing.assert_close(backbone(pixels), torch.cat([norm(hidden[1]), norm(hidden[2])], dim=-1))
    kept = [m for name, m in backbone.encoder.named_modules() if name.endswith(("encoder.layer", "encoder.layers"))]
    assert len(kept) == 1 and len(kept[0]) == 2  # blocks 3 and 4 are gone
    assert len(VisionBackbone.from_folder(folder, image_size=NATIVE_SIZE, layer=[-3, -1]).encoder.state_dict()) == \
        len(model.state_dict())  # the last block is chosen: nothing dropped


def test_a_list_of_layers_concatenates_their_tokens_along_the_width(tiny_open_clip_name: str,
                                                                   tmp_path: Path) -> None:
    model = _tiny_dinov2().eval()
    folder = _save_hf_folder(model, tmp_path / "vision")
    materialise("vision", f"open_clip:{tiny_open_clip_name}", tmp_path / "clip")
    pixels = torch.randn(2, 3, NATIVE_SIZE, NATIVE_SIZE)
    for path in (folder, tmp_path / "clip"):
        both = VisionBackbone.from_folder(path, image_size=NATIVE_SIZE, layer=[-2, -1])
        singles = [VisionBackbone.from_folder(path, image_size=NATIVE_SIZE, layer=index) for index in (-2, -1)]
        torch.testing.assert_close(both(pixels), torch.cat([single(pixels) for single in singles], dim=-1),
                                   atol=1e-4, rtol=1e-4)
        assert both.hidden_size == 2 * singles[0].hidden_size and both.metadata()["layer"] == "-2,-1"
    with pytest.raises(ValueError, match=r"or a list of such blocks"):
        VisionBackbone.from_folder(folder, image_size=NATIVE_SIZE, layer=[-1, -3])


def test_open_clip_layer_takes_that_block_through_ln_post(tiny_open_clip_name: str, tmp_path: Path) -> None:
    materialise("vision", f"open_clip:{tiny_open_clip_name}", tmp_path / "vision")
    backbone = VisionBackbone.from_folder(tmp_path / "vision", image_size=NATIVE_SIZE, layer=-2)
    encoder = backbone.encoder
    pixels = torch.randn(1, 3, NATIVE_SIZE, NATIVE_SIZE)
    with torch.no_grad():
        hidden = encoder.ln_pre(encoder._embeds(pixels))
        blocks = encoder.transformer.resblocks
        for block in blocks[:len(blocks) - 1]:  # all but the last block
            hidden = block(hidden)
        expected = encoder.ln_post(hidden)
    torch.testing.assert_close(backbone(pixels), expected, atol=1e-4, rtol=1e-4)  # open_clip's fused attention
    last = VisionBackbone.from_folder(tmp_path / "vision", image_size=NATIVE_SIZE)
    assert (last(pixels) - expected).abs().max() > 1e-2
