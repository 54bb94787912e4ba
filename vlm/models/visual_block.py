"""The visual block's layout: how the Q-Former's queries sit in the LLM's prompt, as one frozen config.

Plain (BLIP-2): the queries in a row. With a spatial grid (`grid` > 0, the synthetic scenes' recipe,
`train_vlm.grid`): each query attends around its cell (vlm/models/spatial_prior.py); with `cell_labels` each cell's
name in words comes before its queries and `spare_label` before the queries left over (vlm/models/cell_labels.py);
with `empty_cells` the cells whose queries all name the empty phrase are left out (vlm/models/empty_cells.py).
The model takes a whole VisualBlock at once and saves it in its config, so no part can be set without the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm.models.empty_cells import EmptyCellRule
from vlm.models.spatial_prior import LEGACY_WIDTH_IN_CELLS

LEGACY_SPARE_LABEL = "count"  # the spare queries' label in models saved before it was a param


@dataclass(frozen=True)
class VisualBlock:
    grid: int = 0  # cells per side of the queries' spatial grid; 0 = plain queries
    width: float = LEGACY_WIDTH_IN_CELLS  # the spatial prior's sigma, in cells (with a grid)
    cell_labels: bool = False
    spare_label: str = ""  # the label before the queries left over (with cell labels)
    empty_cells: EmptyCellRule | None = None  # which cells to leave out (with cell labels)

    def __post_init__(self) -> None:
        if self.grid < 0:
            raise ValueError(f"visual block: grid must be >= 0 (0 = plain queries), got {self.grid}")
        if self.cell_labels and not self.grid:
            raise ValueError("cell labels name the cells of a spatial grid, and there is none (train_vlm.grid.size: "
                             "0); set train_vlm.grid.cell_labels: false")
        if self.cell_labels and not self.spare_label.strip():
            raise ValueError("cell labels need a spare label, the words before the queries left over "
                             "(train_vlm.grid.spare_label)")
        if self.empty_cells is not None and not self.cell_labels:
            raise ValueError("only labelled cells can be left out (the labels say which cells remain); set "
                             "train_vlm.grid.cell_labels: true, or train_vlm.grid.drop_empty_cells: false")

    def to_dict(self) -> dict:
        return {"grid": self.grid, "width": self.width, "cell_labels": self.cell_labels,
                "spare_label": self.spare_label, "empty_cells": self.empty_cells.to_dict() if self.empty_cells else None}

    @classmethod
    def from_dict(cls, values: dict) -> VisualBlock:
        rule = values.get("empty_cells")
        return cls(int(values["grid"]), float(values["width"]), bool(values["cell_labels"]),
                   str(values["spare_label"]), EmptyCellRule.from_dict(rule) if rule else None)

    @classmethod
    def from_legacy_config(cls, config: dict, grid: int, width: float) -> VisualBlock:
        """The block of a model saved before there was one: its keys at the top of vlm_config.json, the grid in its
        Q-Former's config."""
        labels = bool(config.get("cell_labels", False))
        rule = config.get("empty_cells")
        return cls(grid, width, labels, config.get("spare_label", LEGACY_SPARE_LABEL) if labels else "",
                   EmptyCellRule.from_dict(rule) if rule else None)
