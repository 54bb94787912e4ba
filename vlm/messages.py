"""OpenAI-style chat messages -> one `Conversation` about (at most) one image, with clear errors on bad input.

    [{"role": "system", "content": "..."},
     {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]},
     {"role": "assistant", "content": "a red circle"},
     {"role": "user", "content": "and its colour?"}]

The model reads one image, as one visual block between the system prompt and the first user turn (README,
"Prompt layout"), so a conversation holds at most one image, wherever its message put it (a client that sends
the same image again is fine). Images come as base64 `data:` URLs, as PIL images (`{"type": "image", "image":
img}`, for library users) or, only when the `ImagePolicy` names an allowed folder, as local files inside it.
Nothing is fetched from the network. Everything is checked before any model runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

ROLES = ("system", "user", "assistant")


class MessageError(ValueError):
    """Bad chat input: the message says what is wrong and how to fix it (a server answers it with a 400)."""


class ContextError(MessageError):
    """The conversation does not fit the LLM's context; the message gives the token counts."""

    def __init__(self, message: str, prompt_tokens: int, max_tokens: int, context: int):
        super().__init__(message)
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context


@dataclass(frozen=True)
class ImagePolicy:
    """Which images a conversation may bring: at most `max_bytes` of encoded file and `max_pixels` pixels; local
    files (paths, file:// URLs) only inside `allowed_dir` (None: none at all), after resolving symlinks and `..`."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    allowed_dir: Path | None = None


@dataclass(frozen=True)
class Conversation:
    """A chat about one image (or none): `system` replaces the model's trained system prompt (None keeps it);
    `turns` are (user text, assistant reply) pairs, the last one's reply None: the one to generate."""

    system: str | None
    image: Image.Image | None
    turns: tuple[tuple[str, str | None], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "turns", tuple((user, reply) for user, reply in self.turns))
        if not self.turns or self.turns[-1][1] is not None:
            raise MessageError("a conversation must end with a user turn, the one to answer")
        if any(reply is None for _, reply in self.turns[:-1]):
            raise MessageError("every user turn but the last needs the assistant's reply")

    def without_oldest(self, count: int) -> Conversation:
        """The conversation less its `count` oldest turns (the image and system prompt stay)."""
        if not 0 <= count < len(self.turns):
            raise ValueError(f"can drop 0 to {len(self.turns) - 1} turns of {len(self.turns)}, not {count}")
        return Conversation(self.system, self.image, self.turns[count:])


def parse_messages(messages: list[dict[str, Any]], images: ImagePolicy | None = None) -> Conversation:
    """The `Conversation` of OpenAI-style `messages` (see the module doc). Consecutive messages of one role join
    (one per line); system messages join into one system prompt. MessageError names the message at fault."""
    images = images or ImagePolicy()
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    system: list[str] = []
    turns: list[list[str | None]] = []  # [user text, reply]
    image, image_key = None, None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise MessageError(f"{where}: a message is an object with 'role' and 'content', got {message!r:.80}")
        role = message.get("role")
        if role == "developer":  # the OpenAI API's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise MessageError(f"{where}: role {role!r} is not supported; use one of {', '.join(ROLES)}")
        text, found = _content(message.get("content"), role, where, images)
        if found is not None:
            key, picture = found
            if image_key is not None and key != image_key:
                raise MessageError(f"{where}: a second image; the model reads one image per conversation, so "
                                   "start a new conversation for another image")
            image, image_key = picture, key
        if role == "system":
            system.append(text)
        elif role == "user":
            if turns and turns[-1][1] is None:
                turns[-1][0] = "\n".join(part for part in (turns[-1][0], text) if part)
            else:
                turns.append([text, None])
        else:
            if not turns:
                raise MessageError(f"{where}: an assistant message before any user message; the conversation "
                                   "starts with the user (after any system message)")
            turns[-1][1] = text if turns[-1][1] is None else f"{turns[-1][1]}\n{text}"
    if not turns or turns[-1][1] is not None:
        raise MessageError("the last message must be from the user: it is the one the model answers")
    if not any(user.strip() for user, _ in turns) and image is None:
        raise MessageError("the messages hold no text and no image: there is nothing to answer")
    return Conversation("\n".join(system) if system else None, image, tuple(map(tuple, turns)))


def _content(content: Any, role: str, where: str, images: ImagePolicy) -> tuple[str, tuple[Any, Image.Image] | None]:
    """(the message's text, (a key that tells images apart, the image) or None)."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise MessageError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts, found = [], None
    for number, part in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        if kind not in ("image_url", "image"):
            raise MessageError(f"{at}: a part is {{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
                               f"'image_url': {{'url': ...}}}}, got {part!r:.80}")
        if role != "user":
            raise MessageError(f"{at}: only user messages may hold an image")
        if found is not None:
            raise MessageError(f"{at}: a second image; the model reads one image per conversation")
        if kind == "image":
            picture = part.get("image")
            if not isinstance(picture, Image.Image):
                raise MessageError(f"{at}: an 'image' part holds a PIL image, got {type(picture).__name__}")
            _check_pixels(picture, images, at)
            found = (("pil", picture.size, picture.mode, picture.tobytes()), picture.convert("RGB"))
        else:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise MessageError(f"{at}: image_url needs a 'url' (a data: URL with base64 image bytes)")
            data = _image_bytes(url, images, at)
            found = (("bytes", data), _decode(data, images, at))
    return "\n".join(texts), found


def _image_bytes(url: str, images: ImagePolicy, at: str) -> bytes:
    """The encoded image a URL names: a data: URL, or an allowed local file."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise MessageError(f"{at}: a data URL must read data:image/<type>;base64,<base64 bytes>")
        if len(payload) * 3 // 4 > images.max_bytes:
            raise MessageError(f"{at}: the image is over {images.max_bytes} bytes; send a smaller image")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MessageError(f"{at}: the data URL's payload is not valid base64") from None
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise MessageError(f"{at}: images are not fetched from the network; send it as a base64 data: URL")
    if images.allowed_dir is None:
        raise MessageError(f"{at}: local image files are not allowed here; send the image as a base64 data: URL")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    root = Path(images.allowed_dir).resolve()
    resolved = (root / path).resolve()  # an absolute path stays itself; symlinks and `..` are followed
    if not resolved.is_relative_to(root):
        raise MessageError(f"{at}: {url!r} is outside the allowed image folder {root}")
    if not resolved.is_file():
        raise MessageError(f"{at}: no image file {url!r} in {root}")
    if resolved.stat().st_size > images.max_bytes:
        raise MessageError(f"{at}: {url!r} is over {images.max_bytes} bytes; use a smaller image")
    return resolved.read_bytes()


def _decode(data: bytes, images: ImagePolicy, at: str) -> Image.Image:
    if len(data) > images.max_bytes:
        raise MessageError(f"{at}: the image is over {images.max_bytes} bytes; send a smaller image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            _check_pixels(picture, images, at)  # from the header, before the pixels are decoded
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise MessageError(f"{at}: not a readable image ({err})") from None


def _check_pixels(picture: Image.Image, images: ImagePolicy, at: str) -> None:
    width, height = picture.size
    if width * height > images.max_pixels:
        raise MessageError(f"{at}: the image is {width}x{height} pixels, over the limit of {images.max_pixels}; "
                           "send a smaller image")
