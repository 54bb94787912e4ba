"""LLaVA's conversation data (LLaVA-Instruct-150K, the LLaVA-1.5 mix, LCS-558K) as Entries.

A file is a JSON list of records (LLaVA's own `.json` files) or JSONL, one record a line (`.jsonl`):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus in the image?"},
                       {"from": "gpt", "value": "The bus in the image is white and red."},
                       {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                       {"from": "gpt", "value": "The back of the bus features an advertisement."}]}

`image` is a path relative to the images folder (`data.llava.images`). The turns alternate human, gpt, ...,
starting with human and ending with gpt; the `<image>` placeholder of the first human turn (and the newline
beside it) is removed, because the model always reads the image before the first user turn. Records without an
`image` (LLaVA mixes in text-only ShareGPT chats) are skipped and counted in the log. Several records about one
image (the LLaVA-1.5 mix asks about many COCO images in several sub-datasets) become one row with several
conversations, keyed by the image path. Other fields are ignored: the format is LLaVA's, not ours, and its files
carry extras. Every error names the file and the record (its index, or its JSONL line, and its `id`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from vlm.data.dataset_io import DatasetError
from vlm.data.entry import Entry, Exchange, jsonl_records, read_json, require, text
from vlm.data.image_files import ImageFolder

IMAGE_TOKEN = "<image>"
# Who speaks, in LLaVA's messages ({"from", "value"}) and in chat messages ({"role", "content"}).
USER_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


def read_llava(paths: Sequence[Path], folder: ImageFolder, split: str) -> list[Entry]:
    """The Entries of a split's LLaVA files, one per image in the order first seen. Raises DatasetError naming
    the file and record that do not fit."""
    entries: dict[str, Entry] = {}
    text_only = 0
    for path in paths:
        for where, record in _records(Path(path)):
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object with 'image' and 'conversations', got "
                                   f"{type(record).__name__}")
            if "id" in record:
                where = f"{where} (id {record['id']!r})"
            if record.get("image") is None:
                text_only += 1
                continue
            image = text(record["image"], where, "image (one path per record)", empty_ok=False)
            if PurePosixPath(image).is_absolute() or Path(image).is_absolute():
                raise DatasetError(f"{where}: image {image!r} must be a path relative to data.llava.images")
            conversation = exchanges(require(record, "conversations", where), f"{where}: conversations")
            if image in entries:
                entries[image].conversations.append(conversation)
            else:
                entries[image] = Entry(image, where, folder, (image,), conversations=[conversation])
    if text_only:
        print(f"data {split}: skipped {text_only} text-only LLaVA records (no image) of "
              f"{', '.join(map(str, paths))}")
    return list(entries.values())


def exchanges(messages: Any, where: str) -> tuple[Exchange, ...]:
    """A conversation as (user, assistant) exchanges, from LLaVA messages ({"from": "human" | "gpt", "value"}), chat
    messages ({"role": "user" | "assistant", "content"}) or exchanges ({"user", "assistant"}). Messages must
    alternate user, assistant, ..., starting with the user and ending with the assistant; `<image>` may appear in
    the first user message only, and is removed there with its newline. Raises DatasetError naming `where`."""
    if isinstance(messages, dict) and messages and all(isinstance(v, list) for v in messages.values()):
        # `datasets` stores a Sequence of dicts as a dict of lists: {"from": [...], "value": [...]}
        lengths = {len(values) for values in messages.values()}
        if len(lengths) == 1:
            messages = [dict(zip(messages, values)) for values in zip(*messages.values())]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: must be a non-empty list of messages ({{'from': 'human' | 'gpt', 'value': "
                           f"text}}), got {messages!r}")
    if all(isinstance(m, dict) and set(m) == {"user", "assistant"} for m in messages):
        messages = [message for m in messages for message in ({"role": "user", "content": m["user"]},
                                                              {"role": "assistant", "content": m["assistant"]})]
    said = [_message(message, f"{where}[{index}]") for index, message in enumerate(messages)]
    for index, (is_user, _) in enumerate(said):
        if is_user != (index % 2 == 0):
            expected, found = ("human", "gpt") if index % 2 == 0 else ("gpt", "human")
            raise DatasetError(f"{where}[{index}]: a {found} turn where a {expected} turn belongs; turns must "
                               "alternate human, gpt, human, gpt, ..., starting with human")
    if len(said) % 2:
        raise DatasetError(f"{where}: {len(said)} turns, an odd number: the last human turn has no gpt reply")
    texts = [value for _, value in said]
    for index, value in enumerate(texts):
        if IMAGE_TOKEN in value and index > 0:
            raise DatasetError(f"{where}[{index}]: {IMAGE_TOKEN} may appear only in the first human turn (one "
                               "image per record)")
    texts[0] = texts[0].replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "")
    texts = [text(value, f"{where}[{index}]", "the text", empty_ok=False) for index, value in enumerate(texts)]
    return tuple(zip(texts[0::2], texts[1::2]))


def _message(message: Any, where: str) -> tuple[bool, str]:
    """(whether the user says it, what is said) of one message."""
    if isinstance(message, dict) and "from" in message:
        role, value = message["from"], message.get("value")
    elif isinstance(message, dict) and "role" in message:
        role, value = message["role"], message.get("content")
    else:
        raise DatasetError(f"{where}: a message must be {{'from': 'human' | 'gpt', 'value': text}}, got {message!r}")
    if role not in USER_ROLES + ASSISTANT_ROLES:
        raise DatasetError(f"{where}: unknown speaker {role!r}; a message is from one of "
                           f"{', '.join(USER_ROLES + ASSISTANT_ROLES)}")
    return role in USER_ROLES, text(value, where, "the message's text")


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a JSON list or a JSONL file (by its suffix)."""
    if path.suffix != ".jsonl":
        records = read_json(path)
        if not isinstance(records, list):
            raise DatasetError(f"{path}: not a LLaVA file: expected a JSON list of records (or a .jsonl file, one "
                               f"record a line), got a {type(records).__name__}")
        yield from ((f"{path}: [{index}]", record) for index, record in enumerate(records))
        return
    yield from ((f"{path}:{number}", record) for number, record in jsonl_records(path))
