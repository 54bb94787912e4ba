"""Pixels in, text out: the frozen backbone and a trained VLM, with the prompts and decoding they were made for.

Built from the pipeline's outputs (`Assistant.from_pipeline`, what the `vlm caption` / `vlm ask` / `vlm chat`
commands use) or from a folder written by `vlm export` (`vlm.load`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm import distributed
from vlm.artifacts import BASE_MODELS_DIR, VLM_DIR
from vlm.config import EvalConfig, LLMConfig, Params
from vlm.messages import ContextError, Conversation, ImagePolicy, MessageError, parse_messages
from vlm.models.backbone import VisionBackbone
from vlm.models.chat import stream_replies
from vlm.models.prompt import Example, question_instruction
from vlm.models.sampling import Sampling
from vlm.models.text_stream import Delta
from vlm.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


class Assistant:
    """Caption images, answer questions about them, or chat about one.

    `caption` and `ask` take one PIL image (and one question) and return a string, or lists of them and return a
    list. Decoding is greedy unless `beams` (or the decoding config) asks for beam search.

    `chat` / `chat_stream` take OpenAI-style messages (`vlm/messages.py`) and a `Sampling`; `stream_batch`
    decodes several conversations in one batch. A conversation whose prompt and `max_tokens` do not fit the LLM's
    context raises ContextError, or with `drop_oldest` loses its oldest turns until it fits (logged; `fit` says
    how many).
    """

    def __init__(self, backbone: VisionBackbone, model: VisionLanguageModel, llm: LLMConfig, decoding: EvalConfig,
                 drop_oldest: bool = False):
        device = distributed.device()  # the GPU when there is one
        self.backbone, self.model = backbone.to(device), model.to(device)
        self.llm, self.decoding = llm, decoding  # prompts; max_new_tokens / max_answer_tokens / num_beams
        self.drop_oldest = drop_oldest

    @classmethod
    def from_pipeline(cls, params: Params, model_dir: Path = VLM_DIR,
                      vision_dir: Path = BASE_MODELS_DIR / "vision", drop_oldest: bool = False) -> Assistant:
        """The pipeline's trained model (run from the repository root after `dvc repro`)."""
        backbone = VisionBackbone.from_folder(vision_dir, params.backbone.image_size, params.backbone.layer)
        return cls(backbone, VisionLanguageModel.load(model_dir), params.llm, params.eval, drop_oldest)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B, T, D] backbone tokens of the images, as the `embed` stage caches them (fp32)."""
        return self.backbone(self.backbone.preprocess(list(images))).float()

    def generate(self, images: Sequence[Image.Image], instructions: Sequence[str], max_new_tokens: int,
                 beams: int | None = None) -> list[str]:
        """One reply per (image, instruction) pair."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images for {len(instructions)} instructions; give one per image")
        return self.model.generate(self.embed(images), list(instructions), max_new_tokens,
                                   beams or self.decoding.num_beams)

    def caption(self, images: Image.Image | Sequence[Image.Image], beams: int | None = None) -> str | list[str]:
        """A caption per image."""
        batch = [images] if isinstance(images, Image.Image) else list(images)
        captions = self.generate(batch, [self.llm.caption_prompt] * len(batch), self.decoding.max_new_tokens, beams)
        return captions[0] if isinstance(images, Image.Image) else captions

    def ask(self, images: Image.Image | Sequence[Image.Image], questions: str | Sequence[str],
            beams: int | None = None) -> str | list[str]:
        """One question per image; one image with several questions, or one question for several images, too."""
        batch = [images] if isinstance(images, Image.Image) else list(images)
        asked = [questions] if isinstance(questions, str) else list(questions)
        if len(batch) == 1:
            batch = batch * len(asked)
        elif len(asked) == 1:
            asked = asked * len(batch)
        instructions = [question_instruction(question, self.llm) for question in asked]
        answers = self.generate(batch, instructions, self.decoding.max_answer_tokens, beams)
        return answers[0] if isinstance(images, Image.Image) and isinstance(questions, str) else answers

    # ------------------------------------------------------------------ chat

    def chat(self, messages: list[dict[str, Any]] | Conversation, sampling: Sampling | None = None,
             images: ImagePolicy | None = None) -> str:
        """The assistant's reply to OpenAI-style `messages` (or a parsed `Conversation`)."""
        return "".join(self.chat_stream(messages, sampling, images))

    def chat_stream(self, messages: list[dict[str, Any]] | Conversation, sampling: Sampling | None = None,
                    images: ImagePolicy | None = None) -> Iterator[str]:
        """The reply as it is decoded, in pieces of text (their concatenation is `chat`'s reply). Bad messages
        raise MessageError here, before the first piece is asked for."""
        conversation = messages if isinstance(messages, Conversation) else parse_messages(messages, images)
        steps = self.stream_batch([conversation], [sampling or Sampling()])  # checks it all now, not at first next()
        return (delta.text for (delta,) in steps if delta is not None and delta.text)

    def stream_batch(self, conversations: Sequence[Conversation], samplings: Sequence[Sampling]
                     ) -> Iterator[list[Delta | None]]:
        """Decode several conversations in one batch: per step a list with one entry per request, its `Delta`
        (the new text, and on its last step the finish reason "stop" or "length"), or None once the request
        finished at an earlier step. Each non-None entry stands for one generated token (usage counts).
        Every conversation is fitted to the context first (`fit`: ContextError, or its oldest turns dropped),
        so a bad one raises before any decoding."""
        if len(conversations) != len(samplings):
            raise ValueError(f"{len(conversations)} conversations for {len(samplings)} samplings; give one each")
        if not conversations:
            return iter(())
        fitted = [self.fit(c, s.max_tokens)[0] for c, s in zip(conversations, samplings)]
        prompts = [self.prompt_ids(c) for c in fitted]
        seen = [c.image is not None for c in fitted]
        return stream_replies(self.model, self._chat_images(fitted), prompts, list(samplings), seen)

    def prompt_ids(self, conversation: Conversation) -> tuple[tuple[int, ...], Example]:
        """(system turn ids, the rest of the prompt: `ChatPrompt.conversation`) of a conversation; the visual
        block goes between them. Text holding the tokenizer's special tokens (role markers, end-of-turn) is refused:
        it would forge turns."""
        special = [t for t in self.model.tokenizer.all_special_tokens if t]
        texts = [conversation.system or ""] + [text or "" for turn in conversation.turns for text in turn]
        for text in texts:
            forged = [token for token in special if token in text]
            if forged:
                raise MessageError(f"a message holds the special token {forged[0]!r}, which only the chat template "
                                   "may write; remove it")
        return self.model.prompt.conversation(conversation.turns, conversation.system)

    def count_prompt_tokens(self, conversation: Conversation) -> int:
        """The prompt's tokens: system turn, visual block (at its longest: with empty cells left out an image
        may take fewer), the turns and the assistant header."""
        system, example = self.prompt_ids(conversation)
        visual = self.model.num_visual_tokens if conversation.image is not None else 0
        return len(system) + visual + example.num_tokens

    @property
    def context(self) -> int | None:
        """The LLM's context in tokens (None: it states none)."""
        return getattr(self.model.base_llm.config, "max_position_embeddings", None)

    def fit(self, conversation: Conversation, max_tokens: int) -> tuple[Conversation, int]:
        """(the conversation whose prompt leaves `max_tokens` of the LLM's context for the reply, how many of its
        oldest turns were dropped for that). Without `drop_oldest`, or when even the last user turn alone does
        not fit, raises ContextError with the numbers."""
        context = self.context
        dropped = 0
        while True:
            tokens = self.count_prompt_tokens(conversation)
            if context is None or tokens + max_tokens <= context:
                break
            if not self.drop_oldest or len(conversation.turns) == 1:
                hint = ("drop older turns, shorten the messages or ask for fewer max_tokens" if not self.drop_oldest
                        else "shorten the last message or ask for fewer max_tokens")
                raise ContextError(f"the prompt takes {tokens} tokens and the reply may take {max_tokens}: "
                                   f"{tokens + max_tokens} in all, over the LLM's context of {context} tokens"
                                   f"{f' (after dropping the {dropped} oldest turns)' if dropped else ''}; {hint}",
                                   tokens, max_tokens, context)
            conversation, dropped = conversation.without_oldest(1), dropped + 1
        if dropped:
            log.warning("dropped the %d oldest turn(s) of a conversation to fit the LLM's context of %d tokens",
                        dropped, context)
        return conversation, dropped

    def _chat_images(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        """[B, T, D] backbone tokens of each conversation's image (zeros where it has none: left out later)."""
        pictures = [c.image for c in conversations if c.image is not None]
        if not pictures:
            return torch.zeros(len(conversations), 1, self.model.qformer.config.image_hidden_size)
        embedded = iter(self.embed(pictures))
        rows = [next(embedded) if c.image is not None else None for c in conversations]
        blank = torch.zeros_like(next(r for r in rows if r is not None))
        return torch.stack([blank if r is None else r for r in rows])
