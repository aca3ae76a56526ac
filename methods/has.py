"""HaS, Hide-and-Seek (spec §4.2): hide random grid cells of every training image.

Before the forward pass of a training batch, each normalized image is cut into g×g-pixel cells
and every cell is set to 0 - the ImageNet mean colour, in normalized space - with probability p.
The loss is CAM's cross-entropy on the hidden batch; test time is CAM's, with nothing hidden
(spec §3.4). With DA-WSOL the target sample assigner sees the hidden batch's features (spec §5.8).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from wsolbench.errors import WsolbenchError
from wsolbench.methods.base import StepOutput, TrainingProgress, WSOLMethod
from wsolbench.methods.registry import register_method

# Spec §4.7: the wsolevaluation code defaults (the Options hold DA's).
WE_DEFAULTS = {"grid_size": 4, "drop_rate": 0.5}


def hidden_cells(batch_size: int, rows: int, cols: int, grid_size: int, drop_rate: float) -> Tensor:
    """Which cells to hide: a (B, ceil(rows/g), ceil(cols/g)) bool grid drawn from Python's `random`.

    Spec §4.2: one u ~ U[0,1) per cell, image by image, row starts in the outer loop and column
    starts in the inner one; u <= p hides. Drawing them as one flat list keeps exactly that order.
    """
    grid_rows = -(-rows // grid_size)
    grid_cols = -(-cols // grid_size)
    draws = [random.random() for _ in range(batch_size * grid_rows * grid_cols)]
    hidden = [u <= drop_rate for u in draws]
    return torch.tensor(hidden, dtype=torch.bool).view(batch_size, grid_rows, grid_cols)


def scaled_grid_size(grid_size: int, crop_size: int, reference_size: int = 224) -> int:
    """The grid size for a crop of `crop_size` px, from a grid given for 224-px crops (>= 1, or 0)."""
    if grid_size == 0 or crop_size == reference_size:
        return grid_size
    return max(1, round(grid_size * crop_size / reference_size))


def hide_patches(images: Tensor, grid_size: int, drop_rate: float) -> Tensor:
    """The batch with HaS's cells set to 0 (spec §4.2); `images` itself is left unchanged.

    The reference zeroes the cells of the batch in place; this returns a new tensor with the
    same values. Border cells are partial (g = 111 on 224 px: cells start at 0, 111 and 222, the
    last 2 px wide). g = 0 disables HaS and draws nothing.
    """
    if grid_size == 0:
        return images
    batch_size, _, rows, cols = images.shape
    cells = hidden_cells(batch_size, rows, cols, grid_size, drop_rate)
    # Each cell covers g×g pixels; cropping the expanded grid gives the partial border cells.
    pixels = cells.repeat_interleave(grid_size, dim=1).repeat_interleave(grid_size, dim=2)[:, :rows, :cols]
    return images.masked_fill(pixels[:, None].to(images.device), 0.0)


@register_method
class HaS(WSOLMethod):
    """CAM trained on batches with random grid cells hidden (spec §4.2)."""

    name = "has"

    @dataclass
    class Options:
        grid_size: int = 111  # g in pixels; 0 disables HaS. DA code default (spec §4.7)
        drop_rate: float = 0.19  # p: a cell is hidden when its u <= p. DA code default (spec §4.7)

        def __post_init__(self) -> None:
            grid = self.grid_size
            if isinstance(grid, bool) or not isinstance(grid, (int, float)) or not float(grid).is_integer() or grid < 0:
                raise WsolbenchError(f"has option grid_size must be a whole number of pixels >= 0 "
                                     f"(0 disables HaS), got {grid!r}")
            self.grid_size = int(grid)
            if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate <= 1.0:
                raise WsolbenchError(f"has option drop_rate must be a number in [0, 1], got {self.drop_rate!r}")

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return dict(WE_DEFAULTS) if profile == "WE" else {}

    def training_step(self, images: Tensor, labels: Tensor, progress: TrainingProgress) -> StepOutput:
        """CAM's step on the hidden batch (spec §4.2: training only, before the forward pass).

        grid_size is in pixels of the protocol's 224-px crop; other crop sizes scale it, so that
        the hidden cells cover the same share of the image (at 224 px it is used as given).
        """
        grid = scaled_grid_size(self.options.grid_size, images.shape[2])
        hidden = hide_patches(images, grid, self.options.drop_rate)
        return super().training_step(hidden, labels, progress)
