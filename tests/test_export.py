"""`vlm export` and `vlm.load`: one folder that captions raw images on its own, with the same outputs as before.

Built from tiny random models (tests/tiny_models.py) with every trainable weight perturbed, so that a LoRA lost or
mis-merged on the way would change the outputs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import VISION_IMAGE_SIZE, VISION_WIDTH, tiny_vision, tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)
from typer.testing import CliRunner

import vlm
from vlm.assistant import Assistant
from vlm.cli import app
from vlm.config import BackboneConfig, EvalConfig, LLMConfig, Params
from vlm.data.dataset_io import decode_image
from vlm.data.synthetic import generate_records
from vlm.export import EXPORT_CONFIG, export
from vlm.weights.sources import materialise

PARAMS = Params(backbone=BackboneConfig(source="tiny/vision", image_size=VISION_IMAGE_SIZE, layer=-1),
                llm=LLMConfig(system_prompt="Answer about the image.", caption_prompt="Describe the image.",
                              question_suffix=" Answer with one word."),
                eval=EvalConfig(max_new_tokens=6, max_answer_tokens=3))
METRICS = {"cider": 0.5, "tokenizer": "ptb", "vqa_accuracy": 0.25, "blind_vqa_accuracy": 0.2,
           "visual_gain_vqa": 0.05}
QUESTION = "how many objects are there?"


def build_sources(root: Path) -> tuple[Path, Path]:
    """(trained-model folder, backbone folder) as the pipeline leaves them, from tiny random models."""
    vision = root / "models" / "base" / "vision"
    materialise("vision", str(tiny_vision(root / "tiny_vision")), vision)
    model = tiny_vlm(tiny_vlm_folders(root / "parts", image_width=VISION_WIDTH), perturb_seed=1)
    model.save(root / "models" / "vlm")
    return root / "models" / "vlm", vision


def images(count: int = 3) -> list:
    return [decode_image(r["image"]) for r in generate_records(seed=5, num_images=count, image_size=48)]


def logits(assistant: Assistant, pictures: list, instruction: str) -> torch.Tensor:
    model = assistant.model
    with torch.no_grad():
        embeds, layout = model.build_inputs(assistant.embed(pictures),
                                            [[model.prompt.example(instruction)]] * len(pictures), left_pad=True)
        return model.llm(inputs_embeds=embeds, attention_mask=layout.attention_mask).logits


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_exported_folder_alone_gives_the_same_outputs(tmp_path: Path, merge: bool) -> None:
    model_dir, vision_dir = build_sources(tmp_path / "pipeline")
    before = Assistant.from_pipeline(PARAMS, model_dir, vision_dir)
    pictures = images()
    instruction = PARAMS.llm.caption_prompt
    expected_logits = logits(before, pictures, instruction)
    with torch.no_grad(), before.model.llm.disable_adapter():  # the LoRA matters, so losing it would show
        assert not torch.allclose(logits(before, pictures, instruction), expected_logits, atol=1e-3)
    expected_captions, expected_answers = before.caption(pictures), before.ask(pictures, QUESTION)
    assert any(expected_captions) and any(expected_answers)

    out = export(tmp_path / "shared" / "tiny-vlm", PARAMS, merge, model_dir, vision_dir, METRICS)
    shutil.rmtree(tmp_path / "pipeline")  # nothing outside the folder is needed any more
    after = vlm.load(out)

    torch.testing.assert_close(logits(after, pictures, instruction), expected_logits, atol=1e-5, rtol=1e-5)
    assert after.caption(pictures) == expected_captions
    assert after.ask(pictures, QUESTION) == expected_answers
    assert after.caption(pictures[0]) == expected_captions[0]  # one image in, one string out
    assert after.ask(pictures[1], QUESTION) == expected_answers[1]

    assert (out / "adapter").is_dir() != merge
    with safe_open(str(out / "llm" / "model.safetensors"), "pt") as weights:
        assert not any("lora" in key for key in weights.keys())  # plain LLM weights, merged or base
    assert json.loads((out / EXPORT_CONFIG).read_text())["lora"] == ("merged" if merge else "adapter")
    card = (out / "README.md").read_text()
    assert "| cider | 0.5000 |" in card and "| visual_gain_vqa | 0.0500 |" in card
    assert "tokenizer" not in card  # flat numbers only
    assert 'vlm.load("tiny-vlm")' in card


def test_export_replaces_an_earlier_export_but_no_other_folder(tmp_path: Path) -> None:
    model_dir, vision_dir = build_sources(tmp_path)
    out = tmp_path / "export"
    export(out, PARAMS, True, model_dir, vision_dir)
    export(out, PARAMS, False, model_dir, vision_dir)  # over the earlier export: replaced
    assert (out / "adapter").is_dir()
    assert "No evaluation metrics" in (out / "README.md").read_text()
    with pytest.raises(FileExistsError, match="not an exported model"):
        export(model_dir, PARAMS, True, model_dir, vision_dir)
    assert (model_dir / "vlm_config.json").is_file()


def test_load_of_another_folder_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{EXPORT_CONFIG} not found.*vlm export"):
        vlm.load(tmp_path)


def test_cli_exports_then_captions_with_the_exported_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """`vlm export` with its defaults, run from a repository root, then `vlm caption/ask --model OUT`."""
    model_dir, vision_dir = build_sources(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps({  # JSON is YAML
        "backbone": {"source": "tiny/vision", "image_size": VISION_IMAGE_SIZE, "layer": -1},
        "llm": {"caption_prompt": PARAMS.llm.caption_prompt, "question_suffix": PARAMS.llm.question_suffix},
        "eval": {"max_new_tokens": 6, "max_answer_tokens": 3}}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(METRICS))
    images()[0].save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    expected = Assistant.from_pipeline(PARAMS, model_dir, vision_dir)

    runner = CliRunner()
    result = runner.invoke(app, ["export", "out", "--no-merge"])
    assert result.exit_code == 0, result.output
    assert "| vqa_accuracy | 0.2500 |" in (tmp_path / "out" / "README.md").read_text()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        caption = runner.invoke(app, ["caption", "scene.png", "--model", "out"])
    assert caption.exit_code == 0, caption.output
    assert not [w for w in shown if "is_gradient_checkpointing" in str(w.message)]  # peft's, of no use to a user
    picture = images()[0]
    assert caption.stdout.strip() == expected.caption(picture)
    answer = runner.invoke(app, ["ask", "scene.png", QUESTION, "--model", "out"])
    assert answer.exit_code == 0, answer.output
    assert answer.stdout.strip() == expected.ask(picture, QUESTION)
    refused = runner.invoke(app, ["export", "models"])
    assert refused.exit_code != 0 and "not an exported model" in refused.output
