"""Conversations in the LLM's chat template: token ids, and training labels on the assistant's replies only."""

from __future__ import annotations

import pytest
from tiny_models import IM_END, TINY_VLM_SYSTEM_PROMPT, tiny_llm_tokenizer

from vlm.models.packing import pack
from vlm.models.prompt import IGNORE_INDEX, ChatPrompt

TURNS = [("what colour is the circle?", "red"), ("how many objects are there?", "two objects"),
         ("describe the image.", "a red circle left of a blue square")]


@pytest.fixture(scope="module")
def prompt() -> ChatPrompt:
    return ChatPrompt(tiny_llm_tokenizer(), TINY_VLM_SYSTEM_PROMPT)


def words(prompt: ChatPrompt, ids) -> list[str]:
    return prompt.tokenizer.convert_ids_to_tokens(list(ids))


def test_labels_mark_every_reply_and_its_end_of_turn_and_nothing_else(prompt: ChatPrompt) -> None:
    system, example = prompt.conversation(TURNS)
    assert system == prompt.prefix_ids
    ids = example.user_ids + example.answer_ids
    labels = example.labels
    assert len(labels) == len(ids)
    targets = [word for word, label in zip(words(prompt, ids), labels) if label != IGNORE_INDEX]
    assert targets == ["red", IM_END, "two", "objects", IM_END, "a", "red", "circle", "left", "of", "a", "blue",
                       "square", IM_END]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))
    # the whole prompt is the template's text, in order: no user word or role header is a target
    text = prompt.tokenizer.apply_chat_template(
        [{"role": "system", "content": TINY_VLM_SYSTEM_PROMPT}]
        + [{"role": role, "content": content} for user, reply in TURNS
           for role, content in (("user", user), ("assistant", reply))], tokenize=False)
    assert list(system + ids) == prompt._encode(text)
    ignored = [word for word, label in zip(words(prompt, ids), labels) if label == IGNORE_INDEX]
    assert ignored.count("user") == 3 and ignored.count("assistant") == 3 and ignored.count(IM_END) == 3


def test_packed_conversation_keeps_its_labels(prompt: ChatPrompt) -> None:
    _, example = prompt.conversation(TURNS)
    layout = pack(prompt.prefix_ids, 4, [[example]], pad_id=0, left_pad=False)
    row = layout.labels[0]
    assert (row[:len(prompt.prefix_ids) + 4] == IGNORE_INDEX).all()  # system turn and visual block
    assert row[len(prompt.prefix_ids) + 4:].tolist() == list(example.labels)


def test_one_turn_is_the_single_turn_example(prompt: ChatPrompt) -> None:
    question, answer = TURNS[0]
    assert prompt.conversation([(question, answer)]) == (prompt.prefix_ids, prompt.example(question, answer))
    assert prompt.conversation([(question, None)]) == (prompt.prefix_ids, prompt.example(question))


def test_a_prompt_to_generate_from_ends_with_the_assistant_header(prompt: ChatPrompt) -> None:
    system, example = prompt.conversation([*TURNS[:2], ("describe the image.", None)], "answer about the image.")
    assert example.answer_ids == () and len(example.targets) == 2
    assert words(prompt, example.user_ids[-3:]) == [IM_END, "<|im_start|>", "assistant"]
    # another system prompt (unknown words are <|endoftext|>, the tiny vocabulary's unk)
    assert words(prompt, system) == ["<|im_start|>", "system", "answer", "about", "the", "image", ".", IM_END]


def test_bad_conversations_are_refused(prompt: ChatPrompt) -> None:
    with pytest.raises(ValueError, match="at least one user turn"):
        prompt.conversation([])
    with pytest.raises(ValueError, match="only the last turn"):
        prompt.conversation([("describe the image.", None), ("what colour is the circle?", None)])


def test_plain_layout_without_a_chat_template() -> None:
    tokenizer = tiny_llm_tokenizer()
    tokenizer.chat_template = None
    prompt = ChatPrompt(tokenizer, TINY_VLM_SYSTEM_PROMPT)
    question, answer = TURNS[0]
    assert prompt.conversation([(question, answer)]) == (prompt.prefix_ids, prompt.example(question, answer))
    _, example = prompt.conversation(TURNS)
    targets = [w for w, label in zip(words(prompt, example.user_ids + example.answer_ids), example.labels)
               if label != IGNORE_INDEX]
    assert targets[:5] == ["red", IM_END, "two", "objects", IM_END]
