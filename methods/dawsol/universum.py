"""Universum regularization L_u of DA-WSOL (spec §5.6)."""
from __future__ import annotations

import torch
from torch import Tensor


def universum_loss(universum_rows: Tensor) -> Tensor:
    """L_u = the mean over all elements of U (N_u × C), spec §5.6.

    A mean, not the paper's sum of L1 norms (Eq. 4): the λ2 values are tuned for the mean.
    An empty U gives a zero still in the graph (wsolbench decision; the reference gives NaN).
    """
    with torch.autocast(device_type=universum_rows.device.type, enabled=False):
        rows = universum_rows.to(torch.float32)
        if rows.numel() == 0:
            return rows.sum() * 0.0
        return rows.mean()
