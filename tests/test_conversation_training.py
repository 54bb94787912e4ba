"""Stage 2 on multi-turn conversations: a conversation is one packed segment whose later turns see its earlier
ones; only the assistant's replies and their end-of-turn tokens are targets. Checked on real training rows: a
split with captions, questions and conversations, read and batched as `train_vlm` does, laid out by the tiny VLM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import indexed_embeddings
from tiny_models import IM_END, image_embeds, tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.config import LLMConfig
from vlm.data.dataset_io import write_split
from vlm.data.synthetic import generate_records
from vlm.models.packing import PADDING, SHARED, turn_attention_mask
from vlm.models.prompt import IGNORE_INDEX
from vlm.models.vlm import VisionLanguageModel
from vlm.data.tasks import ConversationTask, load_conversations, load_tasks
from vlm.train.stage2 import conversation_batches, tokenised

CHAT = (("what color is the triangle?", "blue"), ("how many objects are there?", "there are three objects."))
ONLY_CHAT = (("what shape is the blue object?", "a triangle."),)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> VisionLanguageModel:
    return tiny_vlm(tiny_vlm_folders(tmp_path_factory.mktemp("vlm")), perturb_seed=1)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """Two synthetic images (captions + questions), the first with a conversation too, and an image that has only
    a conversation."""
    records = list(generate_records(seed=5, num_images=2, image_size=32, id_prefix="train"))
    records[0]["conversations"] = [[{"user": user, "assistant": reply} for user, reply in CHAT]]
    records.append({**records[1], "image_id": "chat-only", "captions": [], "questions": [], "answers": [],
                    "question_types": [], "regions": [],
                    "conversations": [[{"user": user, "assistant": reply} for user, reply in ONLY_CHAT]]})
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    write_split(records, path)
    return path


def words(model: VisionLanguageModel, ids) -> list[str]:
    return model.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def reply_words(model: VisionLanguageModel, reply: str) -> list[str]:
    return words(model, model.tokenizer(reply, add_special_tokens=False)["input_ids"]) + [IM_END]


def test_load_conversations_reads_each_in_order(split: Path) -> None:
    assert load_conversations(split) == [ConversationTask("train-000000", CHAT),
                                         ConversationTask("chat-only", ONLY_CHAT)]


def test_a_real_packed_row_trains_the_replies_only_and_a_reply_sees_its_conversation_so_far(model, split) -> None:
    caption_tasks, vqa_tasks = load_tasks(split, LLMConfig())
    conversations = load_conversations(split)
    image_ids = ["train-000000", "train-000001", "chat-only"]
    batches = conversation_batches(indexed_embeddings(image_ids), caption_tasks + vqa_tasks, model.prompt,
                                   batch_size=3, seed=0, conversations=tokenised(conversations, model.prompt))
    images, rows = next(batches)
    order = [image_ids[int(image[0, 0])] for image in images]
    with torch.no_grad():
        _, layout = model.build_inputs(image_embeds(3), rows, left_pad=False)
    allowed = turn_attention_mask(layout.segments, "sdpa", torch.float32)[:, 0]
    shared = len(model.prompt.prefix_ids) + model.num_visual_tokens
    captions = {tuple(reply_words(model, c)) for c in caption_tasks[0].answers + caption_tasks[1].answers}
    answers = {tuple(reply_words(model, task.answers[0])) for task in vqa_tasks}
    chat_targets = [reply_words(model, reply) for _, reply in CHAT]

    for row, image_id in enumerate(order):
        ids, labels, segments = layout.ids[row], layout.labels[row], layout.segments[row]
        # No target on the system turn, the visual block or padding; a target is the token at its place.
        assert (labels[segments == SHARED] == IGNORE_INDEX).all()
        assert (labels[segments == PADDING] == IGNORE_INDEX).all()
        assert not layout.is_visual[row][labels != IGNORE_INDEX].any()
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
        kinds = []
        for segment in range(1, int(segments.max()) + 1):
            where = (segments == segment).nonzero().flatten()
            is_target = labels[where] != IGNORE_INDEX
            # Positions run on from the shared part through the whole segment, as in a conversation alone.
            assert layout.position_ids[row, where].tolist() == list(range(shared, shared + len(where)))
            # The targets' runs: the replies, each with its end-of-turn; everything else (user turns, role headers,
            # the template's newlines) is prompt.
            starts = is_target & ~torch.nn.functional.pad(is_target[:-1], (1, 0), value=False)
            runs = [words(model, ids[where][is_target & (starts.cumsum(0) == n)])
                    for n in range(1, int(starts.sum()) + 1)]
            prompt_words = words(model, ids[where][~is_target])
            if len(runs) == 1 and tuple(runs[0]) in captions:
                kinds.append("caption")
            elif len(runs) == 1 and tuple(runs[0]) in answers:
                kinds.append("question")
            else:
                assert image_id != "train-000001"
                expected = chat_targets if image_id == "train-000000" else [reply_words(model, ONLY_CHAT[0][1])]
                assert runs == expected
                turns = CHAT if image_id == "train-000000" else ONLY_CHAT
                assert prompt_words.count("user") == len(turns) and prompt_words.count("assistant") == len(turns)
                kinds.append("conversation")
                # Every token of the conversation sees the shared part and all earlier tokens of the conversation,
                # and nothing of the row's other segments.
                for query in where.tolist():
                    assert allowed[row, query].nonzero().flatten().tolist() == \
                        list(range(shared)) + [key for key in where.tolist() if key <= query]
        expected_kinds = {"train-000000": ["caption"] + ["question"] * 5 + ["conversation"],
                          "train-000001": ["caption"] + ["question"] * 5, "chat-only": ["conversation"]}[image_id]
        assert sorted(kinds) == sorted(expected_kinds)


def test_a_conversation_scores_as_alone_beside_other_segments_and_with_its_earlier_turns(model) -> None:
    """Packed beside a question, a conversation's loss is its loss alone; and its second reply is conditioned on the
    first exchange (as two lone turns, the loss differs)."""
    _, conversation = model.prompt.conversation(CHAT)
    question = model.prompt.example("is there a blue triangle?", "yes")
    image = image_embeds(1)
    with torch.no_grad():
        alone = model(image, [[conversation]])
        beside = model(image, [[question, conversation]])
        question_alone = model(image, [[question]])
        turns_alone = model(image, [[model.prompt.example(user, reply) for user, reply in CHAT]])
    conversation_tokens = sum(label != IGNORE_INDEX for label in conversation.labels)
    question_tokens = len(question.answer_ids)
    total_tokens = conversation_tokens + question_tokens
    expected = (alone * conversation_tokens + question_alone * question_tokens) / total_tokens
    torch.testing.assert_close(beside, expected, atol=1e-5, rtol=1e-5)
    assert abs(float(turns_alone - alone)) > 1e-4, "the second reply should see the first exchange"


def test_turn_average_weighs_each_reply_of_a_conversation_as_one_turn(model) -> None:
    _, first = model.prompt.conversation(CHAT[:1])
    _, both = model.prompt.conversation(CHAT)
    question = model.prompt.example("is there a blue triangle?", "yes")
    image = image_embeds(1)
    with torch.no_grad():
        first_mean, both_mean = model(image, [[first]]), model(image, [[both]])
        question_mean = model(image, [[question]])
        turn_mean = model(image, [[both, question]], average="turn")
    first_tokens = len(first.answer_ids)
    second_tokens = len(both.answer_ids)
    # The first reply sees the same tokens in both conversations, so its mean is first_mean.
    second_mean = (both_mean * (first_tokens + second_tokens) - first_mean * first_tokens) / second_tokens
    torch.testing.assert_close(turn_mean, (first_mean + second_mean + question_mean) / 3, atol=1e-5, rtol=1e-5)


def test_a_conversation_longer_than_the_context_is_refused_with_its_text(model) -> None:
    _, long = model.prompt.conversation([("what color is the triangle?", "blue")] * 30)  # > 256 positions
    with pytest.raises(ValueError, match=r"context of 256 tokens; .*conversation\): 'user what color is the"):
        model.check_context([model.prompt.example("is there a triangle?", "yes"), long])
