"""CutMix (spec §4.6): paste a random box of another image of the batch, mix the labels by area.

With probability `prob` (and only if beta > 0) a training batch is mixed: λ ~ Beta(β, β), a box
covering about 1 − λ of the image is cut from image π(b) and pasted into image b, and the loss
is λ_adj·CE(y) + (1 − λ_adj)·CE(y_π) with λ_adj the area actually kept. The training accuracy is
still measured against y (the trainer does that with the returned logits). With DA-WSOL a mixed
batch gives two labellings, (y, λ_adj) and (y_π, 1 − λ_adj), and the target sample assigner runs
once for each (spec §5.8). Test time is CAM's (spec §3.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsolbench.errors import WsolbenchError
from wsolbench.methods.base import DomainTarget, StepOutput, TrainingProgress, WSOLMethod
from wsolbench.methods.registry import register_method

# Spec §4.7: the wsolevaluation code defaults (the Options hold DA's).
WE_DEFAULTS = {"beta": 1.0, "prob": 1.0}


@dataclass(frozen=True)
class CutBox:
    """Rows [r1, r2) × columns [c1, c2) of the pasted region."""

    r1: int
    r2: int
    c1: int
    c2: int

    @property
    def area(self) -> int:
        return (self.r2 - self.r1) * (self.c2 - self.c1)


@dataclass
class MixedBatch:
    """A CutMix batch: image b carries `box` from image permutation[b]."""

    images: Tensor
    permutation: Tensor  # π, on the images' device
    box: CutBox
    kept_fraction: float  # λ_adj = 1 − box area / image area (spec §4.6)


def random_box(rows: int, cols: int, lam: float) -> CutBox:
    """The box for λ, centre drawn from numpy (spec §4.6).

    cut = int(S·√(1 − λ)) per side; centre randint(S) for the rows, then for the columns; both
    edges at cut//2 from the centre, so the box side is even before clipping to [0, S].
    """
    cut_ratio = np.sqrt(1.0 - lam)
    cut_rows = int(rows * cut_ratio)
    cut_cols = int(cols * cut_ratio)
    centre_row = np.random.randint(rows)
    centre_col = np.random.randint(cols)
    r1 = int(np.clip(centre_row - cut_rows // 2, 0, rows))
    r2 = int(np.clip(centre_row + cut_rows // 2, 0, rows))
    c1 = int(np.clip(centre_col - cut_cols // 2, 0, cols))
    c2 = int(np.clip(centre_col + cut_cols // 2, 0, cols))
    return CutBox(r1, r2, c1, c2)


def cutmix_batch(images: Tensor, beta: float, prob: float) -> MixedBatch | None:
    """Mix the batch with CutMix, or None when this batch is left alone (spec §4.6).

    The batch is mixed iff beta > 0 and prob > u, u = np.random.rand(); beta is tested first, so
    beta <= 0 draws nothing. Then λ = np.random.beta(β, β), π = torch.randperm(B) (torch's CPU
    generator) and the box centre from numpy. The reference pastes into the batch in place; this
    returns a new tensor with the same values and leaves `images` unchanged. The box is sized on
    the batch's own rows and columns.
    """
    if not (beta > 0 and prob > np.random.rand()):
        return None
    lam = np.random.beta(beta, beta)
    permutation = torch.randperm(images.shape[0]).to(images.device)
    rows, cols = images.shape[2], images.shape[3]
    box = random_box(rows, cols, lam)
    mixed = images.clone()
    mixed[:, :, box.r1:box.r2, box.c1:box.c2] = images[permutation, :, box.r1:box.r2, box.c1:box.c2]
    return MixedBatch(mixed, permutation, box, kept_fraction=1.0 - box.area / (rows * cols))


@register_method
class CutMix(WSOLMethod):
    """CAM trained on CutMix batches (spec §4.6)."""

    name = "cutmix"

    @dataclass
    class Options:
        beta: float = 1.35  # β of λ ~ Beta(β, β); <= 0 disables CutMix. DA code default (spec §4.7)
        prob: float = 0.34  # probability that a batch is mixed. DA code default (spec §4.7)

        def __post_init__(self) -> None:
            for option in ("beta", "prob"):
                if not isinstance(getattr(self, option), (int, float)):
                    raise WsolbenchError(f"cutmix option {option} must be a number, got {getattr(self, option)!r}")

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return dict(WE_DEFAULTS) if profile == "WE" else {}

    def training_step(self, images: Tensor, labels: Tensor, progress: TrainingProgress) -> StepOutput:
        mix = cutmix_batch(images, self.options.beta, self.options.prob)
        if mix is None:
            return super().training_step(images, labels, progress)
        features = self.features(mix.images)
        pooled = features.mean(dim=(2, 3))
        logits = self.head(pooled)
        pasted_labels = labels[mix.permutation]
        kept = mix.kept_fraction
        loss = kept * F.cross_entropy(logits, labels) + (1.0 - kept) * F.cross_entropy(logits, pasted_labels)
        # Spec §5.8: both labellings go to DA-WSOL with the loss's weights, even a weight of 0
        # (the assigner's anchors are updated by both runs in the reference).
        return StepOutput(loss=loss, logits=logits, features=features, source_features=pooled,
                          domain_targets=[DomainTarget(labels, kept), DomainTarget(pasted_labels, 1.0 - kept)])
