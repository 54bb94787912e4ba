"""Cell labels: the LLM reads each grid cell's place in words before that cell's visual tokens.

With the spatial grid (vlm/models/spatial_prior.py) the queries of each cell name the object there, but where the
cell lies is only the queries' rank in the visual block, and a short CPU stage 2 did not teach the LLM to read
an unlabelled grid: the answers got colors wrong that the slots named right. With `train_vlm.grid.cell_labels`
the visual block reads like a list of places and what is there, in the captions' own words
(docs/experiments/cell-labels.md; spatial relations stayed at chance):

    " top left" q q q  " top" q q q  " top right" q q q  " left" q q q ... " bottom right" q q q  " count" q q q q q

The labels are the LLM's embeddings of fixed words (13 tokens for the 3 x 3 grid, and `train_vlm.grid.spare_label`
before the spare queries); nothing about them trains.
"""

from __future__ import annotations

from vlm.models.spatial_prior import query_cells

def cell_names(grid: int) -> list[str]:
    """Each cell's place in the captions' words, row-major: "top left", "top", ..., "center", ..., "bottom right"
    for G = 3 (a middle row or centre column goes unnamed); "row r column c" beyond G = 3."""
    if grid > 3:
        return [f"row {r + 1} column {c + 1}" for r in range(grid) for c in range(grid)]
    rows = {1: ["center"], 2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}[grid]
    columns = {1: ["center"], 2: ["left", "right"], 3: ["left", "center", "right"]}[grid]
    names = []
    for row in rows:
        for column in columns:
            words = [w for w in (row, column) if w not in ("middle", "center")]
            names.append(" ".join(words) or "center")
    return names


def labelled_slots(tokenizer, num_queries: int, grid: int, spare_label: str) -> list[int | None]:
    """The visual block with cell labels: token ids of each cell's name (and `spare_label` before the spare
    queries), each followed by None for every query slot of that cell, in query order."""
    names = cell_names(grid)
    layout: list[int | None] = []
    previous = -1
    for cell in query_cells(num_queries, grid):
        if cell != previous:
            name = spare_label if cell is None else names[cell]
            layout += tokenizer(" " + name, add_special_tokens=False)["input_ids"]
            previous = cell
        layout.append(None)
    return layout
