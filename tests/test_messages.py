"""OpenAI-style messages -> a Conversation: what is accepted, and the clear errors on everything else."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from vlm.messages import Conversation, ImagePolicy, MessageError, parse_messages


def png(color: str = "red", size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, url: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


def test_a_conversation_with_history_system_prompt_and_image() -> None:
    conversation = parse_messages([
        {"role": "system", "content": "answer briefly."},
        user("what is this?", data_url(png())),
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": "and its colour?"},
        {"role": "user", "content": [{"type": "text", "text": "one word."}]},
    ])
    assert conversation.system == "answer briefly."
    assert conversation.turns == (("what is this?", "a red square"), ("and its colour?\none word.", None))
    assert conversation.image.size == (8, 8) and conversation.image.getpixel((0, 0)) == (255, 0, 0)
    assert parse_messages([user("hi")]).system is None  # the trained system prompt stays


def test_the_same_image_sent_again_is_one_image_and_a_pil_image_is_accepted() -> None:
    url = data_url(png())
    conversation = parse_messages([user("a?", url), {"role": "assistant", "content": "b"}, user("c?", url)])
    assert conversation.image is not None and len(conversation.turns) == 2
    picture = Image.new("RGB", (4, 4), "blue")
    parsed = parse_messages([{"role": "user", "content": [{"type": "image", "image": picture}]}])
    assert parsed.image.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(("messages", "match"), [
    ([], "non-empty list"),
    ([user("a", data_url(png())), {"role": "assistant", "content": "b"}, user("c", data_url(png("blue")))],
     r"messages\[2\]: a second image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}},
                                   {"type": "image_url", "image_url": {"url": data_url(png("blue"))}}]}],
     r"content\[1\]: a second image"),
    ([user("a"), {"role": "assistant", "content": "b"}], "last message must be from the user"),
    ([{"role": "system", "content": "s"}], "last message must be from the user"),
    ([{"role": "assistant", "content": "b"}, user("a")], "assistant message before any user message"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]: role 'tool' is not supported"),
    ([{"role": "user", "content": 3}], "content must be a string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "a part is"),
    ([user("a", "data:image/png;base64,@@not base64@@")], "not valid base64"),
    ([user("a", "data:text/plain;base64,aGVsbG8=")], "data:image/<type>;base64"),
    ([user("a", "data:image/png;base64," + base64.b64encode(b"not an image").decode())], "not a readable image"),
    ([user("a", "https://example.com/cat.png")], "not fetched from the network"),
    ([user("a", "/etc/hostname")], "local image files are not allowed"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "only user messages may hold an image"),
])
def test_bad_messages_are_refused_with_the_reason(messages: list, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        parse_messages(messages)


def test_oversized_images_are_refused_before_decoding() -> None:
    with pytest.raises(MessageError, match="over 100 bytes"):
        parse_messages([user("a", data_url(png(size=(64, 64))))], ImagePolicy(max_bytes=100))
    with pytest.raises(MessageError, match=r"64x64 pixels, over the limit of 1000"):
        parse_messages([user("a", data_url(png(size=(64, 64))))], ImagePolicy(max_pixels=1000))


def test_local_files_only_inside_the_allowed_folder(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (allowed / "in.png").write_bytes(png())
    (outside / "out.png").write_bytes(png("blue"))
    os.symlink(outside / "out.png", allowed / "link.png")
    policy = ImagePolicy(allowed_dir=allowed)
    assert parse_messages([user("a", "in.png")], policy).image.getpixel((0, 0)) == (255, 0, 0)
    assert parse_messages([user("a", (allowed / "in.png").as_uri())], policy).image is not None
    for url in ("../outside/out.png", str(outside / "out.png"), "link.png", (allowed / ".." / "outside" /
                                                                             "out.png").as_uri()):
        with pytest.raises(MessageError, match="outside the allowed image folder"):
            parse_messages([user("a", url)], policy)
    with pytest.raises(MessageError, match="no image file 'missing.png'"):
        parse_messages([user("a", "missing.png")], policy)


def test_a_conversation_built_by_hand_is_checked() -> None:
    with pytest.raises(MessageError, match="must end with a user turn"):
        Conversation(None, None, (("a", "b"),))
    with pytest.raises(MessageError, match="needs the assistant's reply"):
        Conversation(None, None, (("a", None), ("b", None)))
    conversation = Conversation("s", None, (("a", "b"), ("c", "d"), ("e", None)))
    assert conversation.without_oldest(2).turns == (("e", None),)
