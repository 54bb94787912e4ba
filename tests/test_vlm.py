"""The VLM: prompt layout, label masking, padding, what trains, persistence and batched generation.

Built from a tiny random Q-Former and a tiny random Llama with a ChatML tokenizer (tests/tiny_models.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_VLM_QUERIES as NUM_QUERIES
from tiny_models import TINY_VLM_SYSTEM_PROMPT as SYSTEM
from tiny_models import TINY_VLM_LORA, image_embeds, tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.models.packing import TRAIN_LENGTH_MULTIPLE
from vlm.models.prompt import IGNORE_INDEX, Example
from vlm.models.vlm import STAGE1_ONLY, VisionLanguageModel

# (instruction, answer) pairs of different lengths, so a batch needs padding.
PAIRS = [("Describe the image.", "a large red circle to the left of a small blue square."),
         ("what color is the star? Answer with one word.", "green"),
         ("how many objects are there?", "2")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(Q-Former folder, LLM folder), written once for the module."""
    return tiny_vlm_folders(tmp_path_factory.mktemp("vlm"))


def make_model(folders: tuple[Path, Path], perturb_seed: int | None = None) -> VisionLanguageModel:
    return tiny_vlm(folders, perturb_seed)


@pytest.fixture(scope="module")
def model(folders) -> VisionLanguageModel:
    return make_model(folders, perturb_seed=1)


def examples(model: VisionLanguageModel, with_answers: bool = True) -> list[Example]:
    return [model.prompt.example(q, a if with_answers else None) for q, a in PAIRS]


def single_turn_rows(batch: list[Example]) -> list[list[Example]]:
    return [[example] for example in batch]


def token_embedding(model: VisionLanguageModel, token_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    return model.llm.get_input_embeddings().weight[list(token_ids)]


def test_prompt_is_the_chat_template_with_visual_tokens_between_system_and_user_turn(model) -> None:
    tokenizer = model.tokenizer
    batch = examples(model)
    images = image_embeds(len(batch))
    with torch.no_grad():
        embeds, layout = model.build_inputs(images, single_turn_rows(batch), left_pad=False)
        visual = model.visual_tokens(images)
    mask = layout.attention_mask
    prefix = model.prompt.prefix_ids
    start_of_user = len(prefix) + NUM_QUERIES
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert prefix[0] == im_start and prefix[-1] == im_end  # the whole system turn, closed

    for row, ((instruction, answer), example) in enumerate(zip(PAIRS, batch)):
        # Without the visual block, the row is exactly the tokenised chat transcript of this conversation.
        conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction},
                        {"role": "assistant", "content": answer}]
        transcript = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False),
                               add_special_tokens=False)["input_ids"]
        text_ids = list(prefix + example.user_ids + example.answer_ids)
        assert text_ids == transcript

        length = int(mask[row].sum())
        assert length == len(text_ids) + NUM_QUERIES
        assert torch.equal(embeds[row, :len(prefix)], token_embedding(model, prefix))
        assert torch.equal(embeds[row, len(prefix):start_of_user], visual[row])  # the projector's output
        assert torch.equal(embeds[row, start_of_user:length], token_embedding(model, text_ids[len(prefix):]))
        # The tokens framing the visual block: end of the system turn before, start of the user turn after.
        assert torch.equal(embeds[row, len(prefix) - 1], token_embedding(model, [im_end])[0])
        assert torch.equal(embeds[row, start_of_user], token_embedding(model, [im_start])[0])
    # Each row's visual tokens are its own image's: different images, different tokens.
    assert not torch.allclose(visual[0], visual[1])


def test_only_answer_and_end_of_turn_are_targets(model) -> None:
    tokenizer = model.tokenizer
    batch = examples(model)
    with torch.no_grad():
        embeds, layout = model.build_inputs(image_embeds(len(batch)), single_turn_rows(batch), left_pad=False)
    mask, labels = layout.attention_mask, layout.labels
    for row, (_, answer) in enumerate(PAIRS):
        is_target = labels[row] != IGNORE_INDEX
        expected = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[row][is_target].tolist() == expected
        # Targets are one contiguous block that ends the real (unpadded) sequence.
        length = int(mask[row].sum())
        assert is_target.nonzero().flatten().tolist() == list(range(length - len(expected), length))
        assert (labels[row][mask[row] == 0] == IGNORE_INDEX).all()

    # forward's loss is the mean cross-entropy over exactly those targets (HF's own shifted loss agrees).
    with torch.no_grad():
        reference = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss = model(image_embeds(len(batch)), single_turn_rows(batch))
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def test_packed_turns_score_exactly_as_separate_single_turn_rows(model) -> None:
    """All turns about one image in one row (training) == each turn alone with that image (inference)."""
    batch = examples(model)
    images = image_embeds(2)
    one_image = images[:1]
    with torch.no_grad():
        packed = model(one_image, [batch])
        # The same loss, computed turn by turn: each turn alone, token-weighted like the packed mean.
        losses, weights = [], []
        for example in batch:
            losses.append(model(one_image, [[example]]))
            weights.append(len(example.answer_ids))
    separate = sum(loss * weight for loss, weight in zip(losses, weights)) / sum(weights)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    # Mixed batch: one packed row next to a single-turn row pads; the padding changes nothing.
    with torch.no_grad():
        mixed = model(images, [batch, batch[1:2]])
        alone = model(images[1:], [batch[1:2]])
    total = sum(weights) + weights[1]
    torch.testing.assert_close(mixed, (separate * sum(weights) + alone * weights[1]) / total, atol=1e-5, rtol=1e-5)


def test_turn_average_weighs_every_turn_the_same_however_long_its_answer(model) -> None:
    """average="turn" == the plain mean of each turn's own token-mean loss, over the turns of every row."""
    batch = examples(model)
    images = image_embeds(2)
    with torch.no_grad():
        per_turn = [model(images[:1], [[example]]) for example in batch] + [model(images[1:], [[batch[1]]])]
        turn_mean = model(images, [batch, batch[1:2]], average="turn")
        token_mean = model(images, [batch, batch[1:2]], average="token")
    torch.testing.assert_close(turn_mean, torch.stack(per_turn).mean(), atol=1e-5, rtol=1e-5)
    assert abs(float(turn_mean - token_mean)) > 1e-4, "the answers' lengths differ, so the two means must too"
    with pytest.raises(ValueError, match="average must be"):
        model(images, [batch, batch[1:2]], average="row")


def test_right_padding_for_training_left_padding_for_generation(model) -> None:
    batch = examples(model)
    lengths = [len(model.prompt.prefix_ids) + NUM_QUERIES + len(ex.user_ids) + len(ex.answer_ids) for ex in batch]
    assert len(set(lengths)) > 1, "the test needs rows of different lengths"
    with torch.no_grad():
        _, right = model.build_inputs(image_embeds(len(batch)), single_turn_rows(batch), left_pad=False)
        left_embeds, left = model.build_inputs(image_embeds(len(batch)), single_turn_rows(batch), left_pad=True)
        visual = model.visual_tokens(image_embeds(len(batch)))
    right_mask, left_mask = right.attention_mask, left.attention_mask
    width = max(lengths)
    right_width = -(-width // TRAIN_LENGTH_MULTIPLE) * TRAIN_LENGTH_MULTIPLE  # training rows: to a multiple
    assert right_mask.shape[1] == right_width and right_width % TRAIN_LENGTH_MULTIPLE == 0
    for row, length in enumerate(lengths):
        assert right_mask[row].tolist() == [1] * length + [0] * (right_width - length)
        assert left_mask[row].tolist() == [0] * (width - length) + [1] * length
        # Left padding shifts the whole row, visual block included.
        start = width - length + len(model.prompt.prefix_ids)
        assert torch.equal(left_embeds[row, start:start + NUM_QUERIES], visual[row])


def test_exactly_lora_projector_and_qformer_image_path_train(folders) -> None:
    model = make_model(folders).train()
    for name, parameter in model.llm.named_parameters():
        assert parameter.requires_grad == ("lora_" in name), name
    assert all(p.requires_grad for p in model.projector.parameters())
    for name, parameter in model.qformer.named_parameters():
        stage1_only = name.split(".")[0] in STAGE1_ONLY or ".text_ffn." in name
        assert parameter.requires_grad != stage1_only, name
    assert model.qformer.query_tokens.requires_grad
    assert any(".cross_attention." in n and p.requires_grad for n, p in model.qformer.named_parameters())

    counts = model.trainable_parameter_counts()
    assert counts["trainable_lora"] > 0 and counts["trainable_projector"] > 0 and counts["trainable_qformer"] > 0
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())

    # Behaviourally: a backward pass reaches every trainable weight and no frozen one.
    model(image_embeds(len(PAIRS)), single_turn_rows(examples(model))).backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name


def test_save_then_load_gives_the_same_loss(folders, model, tmp_path: Path) -> None:
    batch, images = single_turn_rows(examples(model)), image_embeds(len(PAIRS))
    with torch.no_grad():
        loss = model(images, batch)
        untrained_loss = make_model(folders)(images, batch)
    assert not torch.isclose(loss, untrained_loss)  # the perturbed weights matter, so the check below can fail

    model.save(tmp_path / "vlm")
    # peft writes its target-module set in hash order, which differs between processes; sorted, reruns are identical
    adapter_config = json.loads((tmp_path / "vlm" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == sorted(TINY_VLM_LORA.target_modules)
    loaded = VisionLanguageModel.load(tmp_path / "vlm")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images, batch), loss)


def test_load_of_a_folder_without_model_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vlm_config.json"):
        VisionLanguageModel.load(tmp_path)


def greedy_without_cache(model: VisionLanguageModel, images: torch.Tensor, instruction: str, steps: int) -> str:
    """Reference decoding: re-run the full sequence for every new token (no KV cache, no padding)."""
    with torch.no_grad():
        embeds, layout = model.build_inputs(images, [[model.prompt.example(instruction)]], left_pad=True)
        mask = layout.attention_mask
        new_ids: list[int] = []
        for _ in range(steps):
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
            token = int(logits.argmax())
            if token == model.prompt.end_of_turn_id:
                break
            new_ids.append(token)
            embeds = torch.cat([embeds, token_embedding(model, [token])[None]], dim=1)
            mask = F.pad(mask, (0, 1), value=1)
    return model.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def test_batched_greedy_generation_equals_one_by_one(model) -> None:
    instructions = [instruction for instruction, _ in PAIRS]
    images = image_embeds(len(instructions), seed=3)
    batched = model.generate(images, instructions, max_new_tokens=6)
    assert len(batched) == len(instructions) and all(isinstance(text, str) for text in batched)
    assert any(batched), "random weights should still produce some words"
    one_by_one = [model.generate(images[i:i + 1], [text], max_new_tokens=6)[0] for i, text in enumerate(instructions)]
    assert batched == one_by_one
    assert batched[0] == greedy_without_cache(model, images[:1], instructions[0], steps=6)


def test_questions_about_one_image_share_its_prompt_cache_and_answer_as_if_alone(model) -> None:
    instructions = [instruction for instruction, _ in PAIRS]
    images = image_embeds(2, seed=4)
    shared = model.generate(images, instructions, max_new_tokens=6, image_index=[0, 0, 1])
    alone = [model.generate(images[i:i + 1], [text], max_new_tokens=6)[0] for i, text in zip([0, 0, 1], instructions)]
    assert shared == alone
    assert shared[1] == greedy_without_cache(model, images[:1], instructions[1], steps=6)
    beams = model.generate(images, instructions, max_new_tokens=6, num_beams=2, image_index=[0, 0, 1])
    assert len(beams) == 3 and all(isinstance(text, str) for text in beams)
    with pytest.raises(ValueError, match="3 instructions but 2 image indices"):
        model.generate(images, instructions, max_new_tokens=2, image_index=[0, 1])


def test_a_question_longer_than_the_context_is_refused_with_its_text(model) -> None:
    context = model.llm.get_base_model().config.max_position_embeddings
    question = "what color is the " + "very " * context + "big circle?"
    with pytest.raises(ValueError, match=rf"exceeds the LLM's context of {context} tokens.*what color is the"):
        model.generate(image_embeds(1), [question], max_new_tokens=2)
