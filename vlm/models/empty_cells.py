"""Empty cells left out: the LLM reads only the grid cells that hold something.

After the grid alignment (vlm/train/align.py, `target: grid`) every query slot of an empty cell names the grid's
empty phrase (`train_vlm.grid.empty_phrase`, " none"). When most cells are empty (a synthetic scene has 1-4
objects in 9 cells), prompts get much shorter with `train_vlm.grid.drop_empty_cells`: a cell whose slots all name
the empty phrase is left out of the visual block, its label with it:

    " top left" q q q  " bottom" q q q  " count" q q q q q      instead of all nine cells

The decision is the model's own, made the way the alignment scores its slots: a slot names the token of the
alignment's vocabulary (the words the slots were trained to name) whose LLM embedding has the largest dot product
with it. It is the same in training and at inference, and it takes no gradient. Leaving out a cell that holds an
object would hide that object, so a cell goes only when all of its slots name the empty phrase.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

@torch.no_grad()
def slot_words(queries: torch.Tensor, embedding_matrix: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """queries [B, Q, D] in the LLM's embedding space, embedding_matrix [V, D], vocab [K] token ids -> [B, Q] the
    token of `vocab` each slot names: the one whose embedding has the largest dot product with it (the alignment's
    score)."""
    return vocab[(queries.float() @ embedding_matrix[vocab].float().T).argmax(-1)]


@dataclass(frozen=True)
class EmptyCellRule:
    """Which cells of the grid are empty, from the slots themselves."""

    none_ids: tuple[int, ...]  # the token ids of the empty phrase (" none": one for most tokenizers)
    vocab: tuple[int, ...]  # the token ids the slots were aligned to name (the empty phrase's among them)

    def __post_init__(self) -> None:
        if not set(self.none_ids) <= set(self.vocab):
            raise ValueError(f"empty-cell rule: the empty phrase's tokens {self.none_ids} are not all in the slot "
                             "vocabulary")

    def to_dict(self) -> dict:
        return {"none_ids": list(self.none_ids), "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, values: dict) -> EmptyCellRule:
        return cls(tuple(int(t) for t in values["none_ids"]), tuple(int(t) for t in values["vocab"]))

    @torch.no_grad()
    def empty(self, queries: torch.Tensor, embedding_matrix: torch.Tensor, query_cell: torch.Tensor,
              num_cells: int) -> torch.Tensor:
        """queries [B, Q, D] (projected into the LLM's embedding space), embedding_matrix [V, D] the LLM's input
        embeddings, query_cell [Q] each query's cell (-1: none) -> [B, num_cells] True where every slot of the
        cell names the empty phrase."""
        words = slot_words(queries, embedding_matrix, torch.tensor(self.vocab, device=queries.device))
        names_none = torch.isin(words, torch.tensor(self.none_ids, device=words.device)).float()
        in_cell = (query_cell[:, None] == torch.arange(num_cells, device=query_cell.device)[None]).float()  # [Q, C]
        slots = in_cell.sum(0)
        return (names_none @ in_cell == slots) & (slots > 0)
