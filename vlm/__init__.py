"""Give a small pretrained text-only LLM vision, the BLIP-2 way.

Frozen image backbone -> cached patch embeddings -> Q-Former -> MLP projector -> frozen LLM + LoRA.

`vlm.load(folder)` loads a model written by `vlm export` and returns an object that captions PIL images
(`.caption(image)`), answers questions about them (`.ask(image, question)`) and chats about one
(`.chat(messages)`, OpenAI-style messages; `.chat_stream`, `.stream_batch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm.assistant import Assistant

__version__ = "0.1.0"


def load(folder: str | Path) -> Assistant:
    """Load a folder written by `vlm export` (see `vlm.export.load`); torch and transformers load on first call."""
    from vlm.export import load as load_export

    return load_export(folder)
