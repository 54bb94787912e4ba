"""Query alignment (vlm/train/align.py): targets, the loss against a hand computation, and training on a tiny VLM."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import (IMAGE_WIDTH, TINY_VLM_IMAGE_TOKENS, tiny_llm_tokenizer, tiny_vlm, tiny_vlm_folders,
                         training_modes)
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.config import AlignConfig, ParamsError, VLMTrainConfig
from vlm.data.dataset_io import write_split
from vlm.data.embeddings import Embeddings, gather
from vlm.data.synthetic import generate_records
from vlm.models.prompt import IGNORE_INDEX
from vlm.train.align import (align_queries, alignment_losses, caption_targets, reference_answers,
                             reference_captions)


def test_caption_targets_truncate_to_the_slots_and_leave_the_rest_free() -> None:
    tokenizer = tiny_llm_tokenizer()
    captions = {"long": "a red circle left of a blue square", "short": "a star"}
    targets = caption_targets(tokenizer, captions, num_slots=4)
    long_ids = tokenizer(captions["long"], add_special_tokens=False)["input_ids"]
    short_ids = tokenizer(captions["short"], add_special_tokens=False)["input_ids"]
    assert len(long_ids) > 4 and len(short_ids) < 4
    assert targets["long"] == long_ids[:4]
    assert targets["short"] == short_ids + [IGNORE_INDEX] * (4 - len(short_ids))


def test_alignment_loss_equals_a_hand_computation() -> None:
    embedding_matrix = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [-1.0, 1.0]])
    vocab = torch.tensor([0, 1, 3])  # token 2 never is a target
    visual = torch.tensor([[[2.0, 1.0], [0.5, 0.5], [9.0, 9.0]]])
    targets = torch.tensor([[0, 3, IGNORE_INDEX]])
    losses = alignment_losses(visual, targets, embedding_matrix, vocab)

    rows = embedding_matrix.tolist()

    def ce(v, target_token):
        logits = [v[0] * rows[t][0] + v[1] * rows[t][1] for t in vocab.tolist()]
        log_z = math.log(sum(math.exp(x) for x in logits))
        return log_z - logits[vocab.tolist().index(target_token)]

    expected_ce = (ce([2.0, 1.0], 0) + ce([0.5, 0.5], 3)) / 2
    expected_distance = (((2 - 1) ** 2 + 1 ** 2) / 1 + ((0.5 + 1) ** 2 + (0.5 - 1) ** 2) / 2) / 2
    assert float(losses["ce"]) == pytest.approx(expected_ce, rel=1e-6)
    assert float(losses["distance"]) == pytest.approx(expected_distance, rel=1e-6)
    assert float(losses["loss"]) == pytest.approx(expected_ce + expected_distance, rel=1e-6)
    # slot 0: logits (2, 1, -1) -> token 0, right; slot 1: (0.5, 1, 0) -> token 1, wrong (wants 3)
    assert float(losses["accuracy"]) == pytest.approx(0.5)


def test_free_slots_do_not_touch_the_loss() -> None:
    embedding_matrix = torch.randn(6, 4)
    vocab = torch.tensor([1, 2, 4])
    targets = torch.tensor([[1, 4, IGNORE_INDEX, IGNORE_INDEX]])
    visual = torch.randn(1, 4, 4)
    changed = visual.clone()
    changed[0, 2:] += 100.0
    assert float(alignment_losses(visual, targets, embedding_matrix, vocab)["loss"]) == pytest.approx(
        float(alignment_losses(changed, targets, embedding_matrix, vocab)["loss"]))


def test_a_batch_without_any_caption_token_is_refused() -> None:
    with pytest.raises(ValueError, match="no caption token"):
        alignment_losses(torch.randn(1, 2, 3), torch.full((1, 2), IGNORE_INDEX), torch.randn(5, 3),
                         torch.tensor([0]))


def test_align_params_are_validated_with_their_names() -> None:
    with pytest.raises(ParamsError, match="train_vlm.align"):
        AlignConfig(steps=-1)
    with pytest.raises(ParamsError, match="qformer_lr"):
        AlignConfig(qformer_lr=-1e-4)
    with pytest.raises(ParamsError, match="train_vlm.align.caption"):
        AlignConfig(caption=-1)


def tiny_alignment_setup(tmp_path: Path) -> tuple[Path, list[str], Embeddings, object]:
    """(dataset of four training images, their ids, fixed random embeddings of them, a tiny VLM)."""
    records = list(generate_records(seed=3, num_images=4, image_size=32, id_prefix="train"))
    dataset = tmp_path / "train.parquet"
    write_split(records, dataset)
    ids = [record["image_id"] for record in records]
    images = torch.randn(len(ids), TINY_VLM_IMAGE_TOKENS, IMAGE_WIDTH, generator=torch.Generator().manual_seed(0))
    return dataset, ids, Embeddings(ids, images.half(), {}), tiny_vlm(tiny_vlm_folders(tmp_path))


def test_alignment_teaches_the_visual_tokens_to_spell_their_captions(tmp_path: Path) -> None:
    """On a tiny VLM, a few hundred steps must make each image's visual tokens decode to its caption's tokens
    through the LLM's embedding matrix far better than before; LoRA and the LLM stay untouched."""
    dataset, ids, embeddings, model = tiny_alignment_setup(tmp_path)
    frozen_before = {name: p.detach().clone() for name, p in model.llm.named_parameters()}

    def slot_accuracy() -> float:
        targets = caption_targets(model.tokenizer, reference_captions(dataset), model.qformer.config.num_queries)
        target = torch.tensor([targets[i] for i in ids])
        matrix = model.llm.get_input_embeddings().weight
        with torch.no_grad():
            predicted = (model.query_tokens(gather(embeddings, ids).float()) @ matrix.T).argmax(-1)
        supervised = target != IGNORE_INDEX
        return float((predicted == target)[supervised].float().mean())

    before = slot_accuracy()
    config = replace(VLMTrainConfig(precision="fp32", checkpoint_every=0, seed=0),
                     align=AlignConfig(steps=150, target="caption", batch_size=4, lr=3e-3,
                                       qformer_lr=3e-3, warmup_steps=5))
    metrics = align_queries(model, embeddings, dataset, config, log_dir=None)
    after = slot_accuracy()
    assert after > max(0.8, before + 0.5), (before, after)
    assert set(metrics) == {"align_loss", "align_ce", "align_distance", "align_accuracy"}
    assert model.empty_cells is None  # caption targets: no cell, and no slot learns to name "none"
    for name, parameter in model.llm.named_parameters():  # the LLM and LoRA are not part of the alignment
        assert torch.equal(parameter, frozen_before[name]), name


def test_alignment_with_qformer_lr_zero_trains_the_projector_alone(tmp_path: Path) -> None:
    dataset, _, embeddings, model = tiny_alignment_setup(tmp_path)
    qformer_before = {name: p.detach().clone() for name, p in model.qformer.named_parameters()}
    projector_before = {name: p.detach().clone() for name, p in model.projector.named_parameters()}
    config = replace(VLMTrainConfig(precision="fp32", checkpoint_every=0, seed=0),
                     align=AlignConfig(steps=3, target="caption", batch_size=4, lr=1e-3, qformer_lr=0.0,
                                       warmup_steps=1))
    modes = training_modes(model.qformer)  # a frozen Q-Former runs without dropout
    align_queries(model, embeddings, dataset, config, log_dir=None)
    assert len(modes) == 3 and not any(modes)
    for name, parameter in model.qformer.named_parameters():
        assert torch.equal(parameter, qformer_before[name]), name
        assert parameter.grad is None, name  # not even computed: no backward through a frozen Q-Former
    assert any(not torch.equal(p, projector_before[n]) for n, p in model.projector.named_parameters())


@pytest.mark.parametrize("dropout", [False, True])
def test_align_dropout_switches_the_qformers_dropout_and_it_trains_either_way(tmp_path: Path, dropout: bool) -> None:
    dataset, _, embeddings, model = tiny_alignment_setup(tmp_path)
    before = {name: p.detach().clone() for name, p in model.qformer.named_parameters()}
    modes = training_modes(model.qformer)
    config = replace(VLMTrainConfig(precision="fp32", checkpoint_every=0, seed=0),
                     align=AlignConfig(steps=2, target="caption", batch_size=4, qformer_lr=1e-3,
                                       warmup_steps=1, dropout=dropout))
    align_queries(model, embeddings, dataset, config, log_dir=None)
    assert modes == [dropout, dropout]  # training mode is what turns dropout on
    assert any(not torch.equal(p, before[name]) for name, p in model.qformer.named_parameters())


def test_reference_captions_picks_the_asked_caption_or_the_last(tmp_path: Path) -> None:
    records = list(generate_records(seed=3, num_images=3, image_size=32, id_prefix="train"))
    records[1]["captions"] = records[1]["captions"][:1]  # an image with a single caption
    records[2]["captions"] = []  # and one without (e.g. a VQA-only import): left out
    # and one with conversations only (LLaVA): their first replies stand in for captions
    chat = [[{"user": "describe it.", "assistant": "a red circle."}, {"user": "sure?", "assistant": "yes."}],
            [{"user": "what is it?", "assistant": "a circle."}]]
    records.append({**records[2], "image_id": "chat", "questions": [], "answers": [], "question_types": [],
                    "conversations": chat})
    write_split(records, tmp_path / "train.parquet")
    second = reference_captions(tmp_path / "train.parquet", 1)
    assert second == {"train-000000": records[0]["captions"][1], "train-000001": records[1]["captions"][0],
                      "chat": "a circle."}
    assert reference_captions(tmp_path / "train.parquet")["train-000000"] == records[0]["captions"][0]


def test_the_answers_target_spells_an_images_answers_in_question_order(tmp_path: Path) -> None:
    records = list(generate_records(seed=2, num_images=3, image_size=32, id_prefix="train"))
    records[1] = dict(records[1], questions=[], answers=[], question_types=[])
    write_split(records, tmp_path / "train.parquet")
    answers = reference_answers(tmp_path / "train.parquet")
    assert set(answers) == {records[0]["image_id"], records[2]["image_id"]}  # no questions: no target
    assert answers[records[0]["image_id"]] == " ".join(a[0] for a in records[0]["answers"])
