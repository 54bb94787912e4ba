"""Evaluation: decoding each distinct (image, instruction) once, the blind baseline, and the gallery.

Built on the tiny random VLM (tests/tiny_models.py); scores are meaningless, their bookkeeping is what is checked.
Java is hidden, so captions are scored with the pure-Python tokenizer (seconds instead of a Java start per call).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import TINY_VLM_IMAGE_TOKENS, image_embeds, tiny_vlm, tiny_vlm_folders
from tiny_qformer import IMAGE_WIDTH, single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.config import EvalConfig
from vlm.data.dataset_io import write_split
from vlm.data.embeddings import Embeddings
from vlm.data.synthetic import generate_records
from vlm.eval.gallery import IMAGE_SIDE, MARGIN, gallery_ids, read_images, write_gallery
from vlm.eval.run import evaluate, predict
from vlm.models.vlm import VisionLanguageModel
from vlm.data.tasks import Task

pytestmark = pytest.mark.filterwarnings("ignore:caption_metrics")
IDS = [f"test-{i:06d}" for i in range(4)]
CONFIG = EvalConfig(batch_size=3, max_new_tokens=5, max_answer_tokens=3)


@pytest.fixture(autouse=True)
def _hide_java(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *args, **kwargs: None if cmd == "java" else real_which(cmd))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> VisionLanguageModel:
    return tiny_vlm(tiny_vlm_folders(tmp_path_factory.mktemp("vlm")), perturb_seed=1)


@pytest.fixture(scope="module")
def store() -> Embeddings:
    return Embeddings(list(IDS), image_embeds(len(IDS), seed=4).half(), {})


@pytest.fixture(scope="module")
def blank() -> Embeddings:
    return Embeddings(["blank"], image_embeds(1, seed=9).half(), {})


def tasks() -> tuple[list[Task], list[Task]]:
    captions = [Task(i, "caption", "Describe the image.", ("a red circle.", "one red circle.")) for i in IDS]
    questions = []
    for n, image_id in enumerate(IDS):
        questions.append(Task(image_id, "count", "how many objects are there?", (str(n % 3 + 1),)))
        questions.append(Task(image_id, "color", "what color is the star?", ("red" if n % 2 else "blue",)))
    return captions, questions


def count_decoded_rows(model: VisionLanguageModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = model.generate

    def spy(images: torch.Tensor, instructions, *args, **kwargs):
        calls.append(len(instructions))
        return original(images, instructions, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_each_distinct_image_and_instruction_is_decoded_once(model, store, monkeypatch) -> None:
    _, questions = tasks()
    repeated = questions + questions[:3]  # the same question about the same image again
    calls = count_decoded_rows(model, monkeypatch)
    answers = predict(model, store, repeated, CONFIG, CONFIG.max_answer_tokens, "questions")
    assert sum(calls) == len(questions)
    one_by_one = [model.generate(store.tokens[IDS.index(t.image_id)][None].float(), [t.instruction], 3)[0]
                  for t in repeated]
    assert answers == one_by_one


def test_blind_baseline_is_the_model_with_every_image_replaced_by_the_blank(model, store, blank,
                                                                             monkeypatch) -> None:
    captions, questions = tasks()
    calls = count_decoded_rows(model, monkeypatch)
    metrics, records = evaluate(model, store, captions, questions, CONFIG, blank)
    seeing_rows = len(IDS) + len(questions)
    assert sum(calls) == seeing_rows + 1 + 2  # blind: one caption, one answer per distinct question

    # The definition, spelled out: a store in which every image's tokens are the blank's, scored as usual.
    all_blank = Embeddings(list(IDS), blank.tokens.expand(len(IDS), TINY_VLM_IMAGE_TOKENS, IMAGE_WIDTH), {})
    blind, _ = evaluate(model, all_blank, captions, questions, CONFIG)
    assert metrics["blind_cider"] == blind["cider"]
    assert metrics["blind_vqa_accuracy"] == blind["vqa_accuracy"]
    assert metrics["blind_vqa_accuracy_count"] == blind["vqa_accuracy_count"]
    assert metrics["visual_gain_cider"] == pytest.approx(metrics["cider"] - blind["cider"])
    assert metrics["visual_gain_vqa"] == pytest.approx(metrics["vqa_accuracy"] - blind["vqa_accuracy"])
    new = {key: value for key, value in metrics.items() if key.startswith(("blind_", "visual_gain_"))}
    assert all(type(value) is float for value in new.values()), new  # flat numbers for `dvc metrics`
    # The blind run adds metrics only: the records are the seeing model's, one per task.
    assert len(records) == len(captions) + len(questions) and {r["image_id"] for r in records} == set(IDS)
    # Without a blank, no baseline.
    assert not any(key.startswith("blind_") for key in evaluate(model, store, captions, questions, CONFIG)[0])


def test_blind_baseline_needs_one_blank_image(model, store) -> None:
    captions, questions = tasks()
    two = Embeddings(["a", "b"], image_embeds(2).half(), {})
    with pytest.raises(ValueError, match="must hold one image, got 2"):
        evaluate(model, store, captions, questions, CONFIG, two)


def records_of(image_ids: list[str]) -> list[dict]:
    records = []
    for image_id in image_ids:
        records.append({"image_id": image_id, "type": "caption", "instruction": "Describe the image.",
                        "prediction": "a small red circle in the middle of the image.",
                        "references": ["a red circle.", "one small red circle near the centre of the picture."]})
        for question, prediction, answer in [("how many objects are there?", "2", "2"),
                                             ("what color is the star?", "blue", "green"),
                                             ("is there a cross?", "no", "no")]:
            records.append({"image_id": image_id, "type": "count", "prediction": prediction,
                            "instruction": question + " Answer with one word.", "references": [answer] * 3})
    return records


def test_gallery_draws_the_first_images_by_id_once_each(tmp_path: Path) -> None:
    rows = list(generate_records(seed=2, num_images=5, image_size=64, id_prefix="test"))
    dataset = tmp_path / "test.parquet"
    write_split(rows, dataset)
    records = records_of([r["image_id"] for r in reversed(rows)])  # records in another order than the ids
    ids = gallery_ids(records, 3)
    assert ids == ["test-000000", "test-000001", "test-000002"]
    images = read_images(dataset, ids)
    assert list(images) == ids and all(isinstance(image, Image.Image) for image in images.values())

    out = tmp_path / "plots" / "gallery"
    out.mkdir(parents=True)
    (out / "stale.png").write_bytes(b"from an earlier run")
    paths = write_gallery(records, images, out, question_suffix=" Answer with one word.")
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in ids] == [p.name for p in paths]
    first = Image.open(paths[0])
    assert first.format == "PNG" and first.width > 224 and first.height >= 224
    # The image itself is on the card, scaled up from 64 px.
    scaled = images[ids[0]].resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BICUBIC)
    assert first.convert("RGB").crop((MARGIN, MARGIN, MARGIN + IMAGE_SIDE, MARGIN + IMAGE_SIDE)) == scaled
    # Deterministic: a second run writes the same bytes, so `dvc plots diff` shows only real changes.
    again = write_gallery(records, images, tmp_path / "again", question_suffix=" Answer with one word.")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
