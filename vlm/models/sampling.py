"""How a reply's tokens are picked: greedy, or temperature + top-p (nucleus) sampling, each request its own way.

A `Sampling` is one request's settings (the OpenAI API's `max_tokens`, `temperature`, `top_p`, `stop`, `seed`);
`Sampler` picks the next token of every row of a decode batch from its row's settings (a `TokenPicker` for
`vlm/models/greedy.py`), so requests with different settings decode in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings.

    max_tokens: most tokens in the reply (end-of-turn included); temperature: 0 = greedy (the likeliest token,
    as `generate` decodes), else logits / temperature; top_p: sample from the smallest set of likeliest tokens
    whose probabilities reach top_p (1 = all); stop: strings that end the reply, which is cut before them;
    seed: the same seed (and prompt) gives the same reply, None draws from torch's global generator.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, as the OpenAI API allows
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a whole number of at least 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be between 0 (greedy) and 100, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token of each row of a batch by its own `Sampling` (row i: samplings[i]); greedy rows take
    the argmax, so a batch of greedy requests decodes exactly as `greedy_decode` does."""

    def __init__(self, samplings: Sequence[Sampling], device: torch.device | str = "cpu"):
        self.samplings = list(samplings)
        self.generators: list[torch.Generator | None] = []
        for sampling in self.samplings:
            generator = None
            if not sampling.greedy and sampling.seed is not None:
                generator = torch.Generator(device=device).manual_seed(sampling.seed)
            self.generators.append(generator)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for i, row in enumerate(rows.tolist()):
            sampling = self.samplings[row]
            if not sampling.greedy:
                tokens[i] = sample(logits[i], sampling.temperature, sampling.top_p, self.generators[row])
        return tokens


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """One token drawn from [V] logits at `temperature`, among the top-p nucleus (the likeliest token is always
    in it)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability mass of the likelier tokens
        sorted_probs[before >= top_p] = 0  # outside the nucleus: the set had reached top_p without them
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]
