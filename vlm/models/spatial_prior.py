"""Queries that start out spatial: each Q-Former query is given a cell of a G x G grid over the image, and its
cross-attention a fixed bias towards the patches around that cell's centre (`train_vlm.grid.size: G`,
from the alignment on; 0 = off, BLIP-2's queries, which all start out looking at the whole image alike). The grid
is part of the Q-Former's saved config (`QFormerConfig.spatial_grid`).

Why: within a CPU run's few hundred steps the Q-Former's cross-attention never learns to read one object's patches
(docs/experiments/spatial-queries.md), although a linear probe reads each patch's color and its row and
column off the cached tokens. With the bias, query q reads its own region from the first step, so the
alignment can ask it to name what lies there (`train_vlm.align.target: grid`). The bias is a Gaussian in patch
distance, added to the attention logits; the content term (query . key) still decides within the region and can
reach beyond it. Its sigma is `train_vlm.grid.width` cells (0.25: 0.67 patches for 8 x 8 patches and
G = 3). A wider look sees much of the neighbouring cells, and the slots then misname cells at their borders
(docs/experiments/grid-width.md).

Queries are dealt out cell by cell, row-major: with 32 queries and G = 3, queries 3c, 3c+1, 3c+2 belong to cell c
(one per word of "size color shape"), and the 5 left over (32 - 27) get the image centre; the grid alignment has
them name the number of objects.
"""

from __future__ import annotations

import math
from functools import cache

import torch

# The Gaussian's sigma, as a fraction of a cell's width, in Q-Formers saved before it was a param
# (`train_vlm.grid.width`, saved as `QFormerConfig.spatial_width`).
LEGACY_WIDTH_IN_CELLS = 0.45
PREFIX_BIAS = -4.0           # CLS / register tokens: still visible, but far less than the query's own region


def queries_per_cell(num_queries: int, grid: int) -> int:
    """How many queries each of the grid x grid cells gets (the rest get no cell)."""
    per_cell = num_queries // (grid * grid)
    if per_cell < 1:
        raise ValueError(f"spatial grid {grid} (train_vlm.grid.size) needs at least {grid * grid} queries "
                         f"(one per cell), but qformer.num_queries is {num_queries}; lower train_vlm.grid.size or raise "
                         "num_queries")
    return per_cell


def query_cells(num_queries: int, grid: int) -> list[int | None]:
    """The grid cell of every query (row-major index), None for the queries left over."""
    per_cell = queries_per_cell(num_queries, grid)
    return [q // per_cell if q < per_cell * grid * grid else None for q in range(num_queries)]


def patch_grid(num_tokens: int) -> tuple[int, int]:
    """(prefix tokens, side) of image tokens laid out as prefix (CLS, registers) + side x side patches."""
    side = math.isqrt(num_tokens)
    if side < 1:
        raise ValueError(f"a spatial grid needs image tokens on a square patch grid, got {num_tokens} tokens")
    return num_tokens - side * side, side


@cache
def cross_attention_bias(num_queries: int, num_tokens: int, grid: int, width: float) -> torch.Tensor:
    """[num_queries, num_tokens] additive logits: 0 at a query's cell centre, falling off with patch distance as a
    Gaussian of sigma `width` cells. Cached (the same for every batch); callers copy it to their device and dtype,
    never modify it."""
    prefix, side = patch_grid(num_tokens)
    rows = torch.arange(side * side) // side
    cols = torch.arange(side * side) % side
    if width <= 0:
        raise ValueError(f"the spatial prior's width must be > 0 cells (train_vlm.grid.width), got {width}")
    sigma = width * side / grid
    bias = torch.full((num_queries, num_tokens), PREFIX_BIAS)
    for query, cell in enumerate(query_cells(num_queries, grid)):
        if cell is None:
            centre_row = centre_col = (side - 1) / 2
        else:
            centre_row = (cell // grid + 0.5) * side / grid - 0.5
            centre_col = (cell % grid + 0.5) * side / grid - 0.5
        squared = (rows - centre_row) ** 2 + (cols - centre_col) ** 2
        bias[query, prefix:] = -squared / (2 * sigma ** 2)
    return bias


def region_cell(x: float, y: float, grid: int) -> int:
    """The row-major grid cell that holds the point (x, y), both fractions of the image (y = 0 at the top)."""
    return min(int(y * grid), grid - 1) * grid + min(int(x * grid), grid - 1)
