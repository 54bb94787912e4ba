"""The shared training loop (schedule, NaN guard) and the batch makers of both training stages."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llm_tokenizer
from tiny_qformer import single_torch_thread, tiny_qformer  # noqa: F401 (autouse fixture)

from vlm.config import LLMConfig, TrainConfig
from vlm.data.dataset_io import write_split
from vlm.data.embeddings import Embeddings
from vlm.data.synthetic import QUESTION_TYPES, generate_records
from vlm.models.prompt import ChatPrompt
from vlm.train.loop import NonFiniteLossError, train, warmup_cosine
from vlm.train.stage1 import caption_batches
from vlm.data.tasks import load_tasks
from vlm.train.stage2 import conversation_batches

FP32 = TrainConfig(lr=0.1, weight_decay=0.0, warmup_steps=1, precision="fp32", log_every=1)


def indexed_embeddings(image_ids: list[str], tokens: int = 3, width: int = 12) -> Embeddings:
    """Embeddings whose every value is the image's row number, so a batch reveals which images it holds."""
    values = torch.arange(len(image_ids), dtype=torch.float16)[:, None, None].expand(-1, tokens, width)
    return Embeddings(list(image_ids), values.contiguous(), {})


# ------------------------------------------------------------------------------------------- schedule


def test_warmup_is_linear_then_cosine_decays_to_a_tenth() -> None:
    factor = warmup_cosine(warmup_steps=4, total_steps=24)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factor(4) == pytest.approx(1.0)  # decay starts at the peak
    assert factor(14) == pytest.approx(0.55)  # half-way through the decay: half-way between 1 and 0.1
    assert factor(24) == pytest.approx(0.1)
    assert factor(100) == pytest.approx(0.1)  # never below the floor, even past the planned end
    decay = [factor(s) for s in range(4, 25)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_warmup_cosine_without_warmup_starts_at_the_peak() -> None:
    factor = warmup_cosine(warmup_steps=0, total_steps=10)
    assert factor(0) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- loop


def test_training_reduces_a_simple_loss_and_reports_smoothed_values() -> None:
    weight = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    final = train([weight], lambda _: {"loss": (weight ** 2).sum()}, itertools.repeat(None), 30, FP32)
    assert float((weight.detach() ** 2).sum()) < 4.0  # started at 13
    assert set(final) == {"loss"} and final["loss"] < 13.0


def test_nan_loss_stops_training_naming_the_step_without_applying_that_update() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    seen: list[torch.Tensor] = []

    def step_losses(step: int) -> dict[str, torch.Tensor]:
        seen.append(weight.detach().clone())
        loss = (weight ** 2).sum()
        return {"loss": loss * float("nan") if step == 3 else loss}

    with pytest.raises(NonFiniteLossError, match=r"step 3\b"):
        train([weight], step_losses, iter(range(10)), 10, FP32)
    assert len(seen) == 4
    assert not torch.equal(seen[0], seen[3])  # the earlier steps did update the weight...
    assert torch.equal(weight.detach(), seen[3])  # ...but the NaN step did not
    assert torch.isfinite(weight).all()


def test_running_out_of_batches_is_an_error() -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(RuntimeError, match="ran out after 2 of 5 steps"):
        train([weight], lambda _: {"loss": (weight - 1).pow(2).sum()}, iter(range(2)), 5, FP32)


# ------------------------------------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def qformer(tmp_path_factory):
    return tiny_qformer(tmp_path_factory.mktemp("bert"))


def test_caption_batches_pair_each_image_with_one_of_its_own_captions(qformer) -> None:
    store_ids = [f"img-{i}" for i in range(7)]
    image_ids = list(reversed(store_ids))  # split order differs from store order: rows must be looked up by id
    # Image k's captions start with word w<k>, so a caption reveals its image after tokenisation.
    captions = [[f"w{k} w20 w21", f"w{k} w30"] for k in range(7)]
    word_id = qformer.tokenizer.convert_tokens_to_ids
    batches = caption_batches(indexed_embeddings(store_ids), image_ids, captions, qformer, batch_size=3, seed=0)

    seen_captions: set[tuple[int, int]] = set()
    for epoch in range(10):
        epoch_rows = []
        for images, ids, mask, rows in itertools.islice(batches, 2):  # 7 images // 3 = 2 full batches an epoch
            assert images.shape == (3, 3, 12) and images.dtype == torch.float32
            assert ids.shape[0] == mask.shape[0] == 3
            epoch_rows += rows.tolist()
            for image, caption_ids, caption_mask, row in zip(images, ids, mask, rows.tolist()):
                # The image tensor is that of image_ids[row] (the store's row number is the value).
                assert image.unique().tolist() == [store_ids.index(image_ids[row])]
                assert caption_ids[0] == qformer.tokenizer.cls_token_id
                assert caption_ids[1] == word_id(f"w{row}")
                seen_captions.add((row, int(caption_mask.sum())))
            assert int(mask.sum(1).max()) == ids.shape[1]  # padding shared by the whole batch is trimmed
        assert len(set(epoch_rows)) == 6  # no image twice within an epoch
    # Both captions of each image get used ([CLS] w<k> w20 w21 [SEP] = 5 tokens, the other 4).
    assert {length for _, length in seen_captions} == {4, 5}


def test_caption_batches_refuse_an_image_without_caption(qformer) -> None:
    ids = ["a", "b"]
    with pytest.raises(ValueError, match="'b' has no caption"):
        next(caption_batches(indexed_embeddings(ids), ids, [["w1"], []], qformer, batch_size=2, seed=0))


# ------------------------------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, list[dict]]:
    records = list(generate_records(seed=5, num_images=4, image_size=32, id_prefix="train"))
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    write_split(records, path)
    return path, records


def test_load_tasks_gives_one_caption_task_per_image_and_one_vqa_task_per_question(split) -> None:
    path, records = split
    llm = LLMConfig(caption_prompt="Describe it.", question_suffix=" One word.")
    caption_tasks, vqa_tasks = load_tasks(path, llm)

    assert [t.image_id for t in caption_tasks] == [r["image_id"] for r in records]
    for task, record in zip(caption_tasks, records):
        assert (task.kind, task.instruction, task.answers) == ("caption", "Describe it.", tuple(record["captions"]))
    expected = [(r["image_id"], q + " One word.", tuple(a), kind) for r in records
                for q, a, kind in zip(r["questions"], r["answers"], r["question_types"])]
    assert [(t.image_id, t.instruction, t.answers, t.kind) for t in vqa_tasks] == expected
    assert {t.kind for t in vqa_tasks} <= set(QUESTION_TYPES)


def test_conversation_batches_hold_every_task_once_per_epoch_beside_its_own_image(split) -> None:
    path, records = split
    caption_tasks, vqa_tasks = load_tasks(path, LLMConfig())
    tasks = caption_tasks + vqa_tasks
    prompt = ChatPrompt(tiny_llm_tokenizer(), "Answer about the image.")
    image_ids = [r["image_id"] for r in records]
    batches = conversation_batches(indexed_embeddings(image_ids), tasks, prompt, batch_size=1, seed=0)

    epoch, order = [], []  # (image id, turn) over one epoch = one row per image; the rows' image order
    for images, rows in itertools.islice(batches, len(image_ids)):
        assert images.dtype == torch.float32 and len(rows) == 1
        order.append(image_ids[int(images[0, 0, 0])])
        epoch += [(order[-1], turn) for turn in rows[0]]
    assert Counter((i, ex.user_ids) for i, ex in epoch) == Counter((t.image_id, prompt.user_ids(t.instruction))
                                                                    for t in tasks)
    by_key = {(t.image_id, prompt.user_ids(t.instruction)): t for t in tasks}
    for image_id, example in epoch:
        task = by_key[(image_id, example.user_ids)]
        assert example.answer_ids in {prompt.answer_ids(answer) for answer in task.answers}
    # Images come shuffled, and so do the turns inside a row (a caption is not always first).
    assert sorted(order) == sorted(image_ids) and order != image_ids
    caption_ids = prompt.user_ids(LLMConfig().caption_prompt)
    positions = {i: [ex.user_ids for j, ex in epoch if j == i].index(caption_ids) for i in image_ids}
    assert len(set(positions.values())) > 1


def test_conversation_batches_yield_only_full_batches(split) -> None:
    path, records = split
    caption_tasks, vqa_tasks = load_tasks(path, LLMConfig())
    prompt = ChatPrompt(tiny_llm_tokenizer(), "Answer about the image.")
    embeddings = indexed_embeddings([r["image_id"] for r in records])
    batch_size = 3
    assert len(records) % batch_size != 0, "the test needs a partial last batch"
    for images, rows in itertools.islice(conversation_batches(embeddings, caption_tasks + vqa_tasks, prompt,
                                                              batch_size, seed=1), 12):
        assert images.shape[0] == len(rows) == batch_size


def test_conversation_batches_group_rows_of_similar_length(tmp_path) -> None:
    """Rows are padded to the longest in their batch, so a batch takes rows of neighbouring lengths: with all rows
    in one pool, the batches' length ranges do not overlap (random batches of 2 from 12 rows almost surely do)."""
    records = list(generate_records(seed=7, num_images=12, image_size=32, id_prefix="train"))
    write_split(records, tmp_path / "train.parquet")
    caption_tasks, vqa_tasks = load_tasks(tmp_path / "train.parquet", LLMConfig())
    prompt = ChatPrompt(tiny_llm_tokenizer(), "Answer about the image.")
    embeddings = indexed_embeddings([r["image_id"] for r in records])
    batches = conversation_batches(embeddings, caption_tasks + vqa_tasks, prompt, batch_size=2, seed=0)
    ranges = []
    for _, rows in itertools.islice(batches, 6):  # one epoch
        lengths = [sum(len(turn.user_ids) + len(turn.answer_ids) for turn in turns) for turns in rows]
        ranges.append((min(lengths), max(lengths)))
    assert len(set(ranges)) > 1, "the test needs rows of different lengths"
    assert ranges != sorted(ranges), "batches should come in random order, not shortest first"
    ranges.sort()
    assert all(low_next >= high for (_, high), (low_next, _) in zip(ranges, ranges[1:]))
