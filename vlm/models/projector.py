"""The MLP that maps Q-Former query outputs to the LLM's embedding width."""

from __future__ import annotations

from torch import Tensor, nn


class Projector(nn.Module):
    """Linear -> GELU -> Linear, as in LLaVA-1.5: a single linear layer under-fits the modality gap."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, query_outputs: Tensor) -> Tensor:
        return self.net(query_outputs)

    def config(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "hidden_dim": self.hidden_dim, "out_dim": self.out_dim}
