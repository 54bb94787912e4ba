"""Pixels in, text out: the frozen backbone and a trained VLM, with the prompts and decoding they were made for.

Built from the pipeline's outputs (`Assistant.from_pipeline`, what the `vlm caption` / `vlm ask` commands use) or
from a folder written by `vlm export` (`vlm.load`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vlm import distributed
from vlm.artifacts import BASE_MODELS_DIR, VLM_DIR
from vlm.config import EvalConfig, LLMConfig, Params
from vlm.models.backbone import VisionBackbone
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import question_instruction


class Assistant:
    """Caption images or answer questions about them.

    `caption` and `ask` take one PIL image (and one question) and return a string, or lists of them and return a
    list. Decoding is greedy unless `beams` (or the decoding config) asks for beam search.
    """

    def __init__(self, backbone: VisionBackbone, model: VisionLanguageModel, llm: LLMConfig, decoding: EvalConfig):
        device = distributed.device()  # the GPU when there is one
        self.backbone, self.model = backbone.to(device), model.to(device)
        self.llm, self.decoding = llm, decoding  # prompts; max_new_tokens / max_answer_tokens / num_beams

    @classmethod
    def from_pipeline(cls, params: Params, model_dir: Path = VLM_DIR,
                      vision_dir: Path = BASE_MODELS_DIR / "vision") -> Assistant:
        """The pipeline's trained model (run from the repository root after `dvc repro`)."""
        backbone = VisionBackbone.from_folder(vision_dir, params.backbone.image_size, params.backbone.layer)
        return cls(backbone, VisionLanguageModel.load(model_dir), params.llm, params.eval)

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
