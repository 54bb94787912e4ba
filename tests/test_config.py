"""params.yaml validation: every mistake must be reported with the dotted key, never silently ignored."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from vlm.config import LLMConfig, Params, ParamsError, QFormerLossWeights, TrainConfig, load_params
from vlm.recipes import apply_recipe

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def write_params(tmp_path: Path, overrides: dict) -> Path:
    """The repository's params.yaml with `overrides` ({"section": {"key": value}}) merged in, as a new file."""
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repository_params_load_into_typed_sections() -> None:
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    assert params.data.train_images == raw["data"]["train_images"]
    assert params.qformer.num_queries == raw["qformer"]["num_queries"]
    assert params.lora.target_modules == tuple(raw["lora"]["target_modules"])
    assert isinstance(params.train_qformer, TrainConfig) and isinstance(params.llm, LLMConfig)
    # YAML integers where a float is expected (e.g. `epochs: 10`) become floats.
    assert isinstance(params.train_qformer.epochs, float)


def test_the_code_defaults_are_the_documented_params_with_blip2s_plain_recipe(tmp_path: Path) -> None:
    # A key left out of params.yaml (or a config built in Python) means what params.yaml says, except that the code
    # defaults to BLIP-2's plain recipe (recipes/own-data.yaml) where params.yaml holds the synthetic scenes' one.
    plain = tmp_path / "plain.yaml"
    shutil.copy(REPO_PARAMS, plain)
    assert apply_recipe(REPO_PARAMS.parent / "recipes" / "own-data.yaml", plain)
    assert Params() == load_params(plain)
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    del raw["train_vlm"]["qformer_lr"], raw["backbone"]["layer"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path) == load_params(REPO_PARAMS)


def test_unknown_key_names_the_dotted_key_and_lists_allowed_keys(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"train_vlm": {"learning_rate": 1e-3}})
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    assert "train_vlm.learning_rate" in message
    for allowed in ("epochs", "batch_size", "lr", "warmup_steps"):
        assert allowed in message


def test_unknown_section_is_reported(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"optimiser": {"lr": 1.0}})
    with pytest.raises(ParamsError, match="optimiser"):
        load_params(path)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("data", "train_images", "2000"),       # a string where an integer is expected
    ("qformer", "separate_query_ffn", 1),   # an integer where a bool is expected
    ("train_qformer", "warmup_steps", True),  # a bool where an integer is expected (bool is an int in Python)
    ("lora", "target_modules", "q_proj"),   # a string where a list is expected
])
def test_wrong_type_names_the_key(tmp_path: Path, section: str, key: str, value: object) -> None:
    path = write_params(tmp_path, {section: {key: value}})
    with pytest.raises(ParamsError, match=rf"\b{section}\.{key}\b"):
        load_params(path)


def test_literal_value_outside_the_allowed_set_lists_the_allowed_values(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"backbone": {"precision": "fp16"}})
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    assert "backbone.precision" in message and "'fp16'" in message
    assert "bf16" in message and "fp32" in message


@pytest.mark.parametrize("value, layers", [(-5, (-5,)), ([-9, -5], (-9, -5))])
def test_backbone_layer_is_one_block_or_a_list(tmp_path: Path, value: object, layers: tuple) -> None:
    assert load_params(write_params(tmp_path, {"backbone": {"layer": value}})).backbone.layers == layers


@pytest.mark.parametrize("value", [3, [-5, -5], [], "-5", [-5, "x"]])
def test_bad_backbone_layer_names_the_key(tmp_path: Path, value: object) -> None:
    with pytest.raises(ParamsError, match=r"backbone\.layer"):
        load_params(write_params(tmp_path, {"backbone": {"layer": value}}))


def test_nested_loss_weights_are_read_and_validated(tmp_path: Path) -> None:
    params = load_params(write_params(tmp_path, {"qformer": {"losses": {"itc": 0.5, "itm": 0, "itg": 2}}}))
    assert params.qformer.losses == QFormerLossWeights(itc=0.5, itm=0.0, itg=2.0)

    with pytest.raises(ParamsError, match=r"qformer\.losses\.itx"):
        load_params(write_params(tmp_path, {"qformer": {"losses": {"itx": 1.0}}}))
    with pytest.raises(ParamsError, match=r"qformer\.losses\.itm"):
        load_params(write_params(tmp_path, {"qformer": {"losses": {"itm": "high"}}}))


def test_missing_file_says_where_to_run_from(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_data_source_lists_the_importers(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as error:
        load_params(write_params(tmp_path, {"data": {"source": "imagenet"}}))
    message = str(error.value)
    assert "data.source" in message
    for allowed in ("synthetic", "coco", "vqav2", "coco+vqav2", "jsonl", "llava", "hf"):
        assert allowed in message


@pytest.mark.parametrize(("overrides", "key"), [
    # Outside data/raw (the data stage's DVC dependency), DVC would not notice the files change.
    ({"source": "jsonl", "jsonl": {"train": ["/datasets/train.jsonl"], "val": ["data/raw/v.jsonl"],
                                   "test": ["data/raw/t.jsonl"]}}, r"data\.jsonl\.train\[0\]"),
    ({"source": "coco", "coco": {"images": "data/raw/../coco"}}, r"data\.coco\.images"),
    # Every split needs a file of the chosen source (the other sources' params are not checked).
    ({"source": "coco+vqav2", "vqav2": {"questions": {"train": ["data/raw/q.json"]},
                                        "annotations": {"train": ["data/raw/a.json"]}}}, r"data\.vqav2\.questions\.val"),
    ({"source": "vqav2", "vqav2": {"questions": {"train": ["data/raw/q.json"], "val": ["data/raw/q.json"],
                                                 "test": ["data/raw/q.json"]},
                                   "annotations": {"train": ["data/raw/a.json"], "val": ["data/raw/a.json"],
                                                   "test": []}}}, r"data\.vqav2\.annotations\.test"),
    ({"source": "llava", "llava": {"images": "/data/llava/images"}}, r"data\.llava\.images"),
    ({"source": "llava", "llava": {"val": []}}, r"data\.llava\.val is empty"),
    ({"source": "hf", "hf": {"test": ["../hf/test"]}}, r"data\.hf\.test\[0\]"),
    ({"hf": {"question_column": "question"}}, r"data\.hf\.question_column and data\.hf\.answer_column"),
    ({"hf": {"caption_column": None}}, r"data\.hf: set at least one of caption_column"),
    ({"hf": {"image_column": None}}, r"data\.hf\.image_column"),
    ({"max_images": {"train": -1}}, r"data\.max_images\.train"),
    ({"resize": 8}, r"data\.resize"),
])
def test_import_params_are_checked_naming_the_key(tmp_path: Path, overrides: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key):
        load_params(write_params(tmp_path, {"data": overrides}))


def test_the_default_import_paths_are_valid_for_every_source(tmp_path: Path) -> None:
    for source in ("coco", "vqav2", "coco+vqav2", "jsonl", "llava", "hf"):
        assert load_params(write_params(tmp_path, {"data": {"source": source}})).data.source == source
