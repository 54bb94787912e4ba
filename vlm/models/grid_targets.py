"""The grid alignment's targets: what each query of a spatial grid should name, from an image's regions.

With `train_vlm.align.target: grid` (vlm/train/align.py) each grid cell's queries learn to spell the phrase of the
object in their cell and the grid's empty phrase where there is none; evaluation reads the slots back against the
same targets (vlm/eval/slots.py).
"""

from __future__ import annotations

from vlm.models.prompt import IGNORE_INDEX
from vlm.models.spatial_prior import queries_per_cell, query_cells, region_cell


def phrase_ids(tokenizer, phrase: str) -> list[int]:
    """The token ids of a phrase as it reads inside a prompt (after a space)."""
    return tokenizer(" " + phrase, add_special_tokens=False)["input_ids"]


def grid_targets(tokenizer, regions: dict[str, list[dict]], num_slots: int, grid: int, empty_ids: list[int]
                 ) -> dict[str, list[int]]:
    """image id -> per slot, a token of the phrase of the object in the slot's grid cell (see
    vlm/models/spatial_prior.py): the cell's k slots name the phrase's first k tokens ("small red circle"), and
    `empty_ids` (the grid's empty phrase) for an empty cell. The slots left over (they look at the image's centre)
    name the number of objects ("3"; a number of several tokens is spelt over them in turn). Of several objects in
    one cell (by centre), the largest box (w * h) names it, the later of equal ones: a photo's cell is mostly its
    largest object."""
    if not grid:
        raise ValueError("train_vlm.align.target 'grid' needs train_vlm.grid.size > 0 (the queries' cells)")
    cells, per_cell = query_cells(num_slots, grid), queries_per_cell(num_slots, grid)
    none = list(empty_ids)
    first_spare = len(cells) - cells.count(None)  # the spare queries come last
    targets = {}
    for image_id, objects in regions.items():
        largest: dict[int, dict] = {}
        for o in objects:
            cell = region_cell(o["x"], o["y"], grid)
            if cell not in largest or o["w"] * o["h"] >= largest[cell]["w"] * largest[cell]["h"]:
                largest[cell] = o
        words = {cell: phrase_ids(tokenizer, o["phrase"]) for cell, o in largest.items()}
        count = tokenizer(str(len(objects)), add_special_tokens=False)["input_ids"]
        slots = []
        for slot, cell in enumerate(cells):
            if cell is None:
                slots.append(count[(slot - first_spare) % len(count)])
                continue
            phrase = words.get(cell, none * per_cell)
            position = slot - cell * per_cell
            slots.append(phrase[position] if position < len(phrase) else IGNORE_INDEX)
        targets[image_id] = slots
    return targets
