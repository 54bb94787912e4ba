"""A stand-in for VisionBackbone that needs only torch: what `embed_split` calls, on 16 px images.

Multi-process tests start fresh interpreters; this spares each of them the ~10 s import of transformers that the
real (even tiny) backbone costs on a busy 2-core machine.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIZE, PATCH, WIDTH = 16, 8, 8


class PixelBackbone(torch.nn.Module):
    """Non-overlapping 8x8 patches through one fixed random linear layer: [B, 3, 16, 16] -> [B, 4, 8]."""

    num_tokens, hidden_size, image_size = (SIZE // PATCH) ** 2, WIDTH, SIZE

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * PATCH * PATCH, WIDTH)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.proj.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = np.stack([np.asarray(image.convert("RGB").resize((SIZE, SIZE))) for image in images])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [B, 3, 2, 2, 8, 8]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(len(pixels), self.num_tokens, -1)
        return self.proj(patches)

    def metadata(self) -> dict[str, str]:
        return {"backbone_name": "test:pixels", "backbone_source": "test", "hidden_size": str(WIDTH),
                "num_tokens": str(self.num_tokens), "image_size": str(SIZE)}
