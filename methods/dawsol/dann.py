"""DANN variant of the DA-WSOL domain loss (spec §5.9)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by −coefficient (spec §5.9)."""

    @staticmethod
    def forward(ctx, inputs: Tensor, coefficient: float) -> Tensor:  # type: ignore[override]
        ctx.coefficient = float(coefficient)
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output.neg() * ctx.coefficient, None


def reverse_gradient(inputs: Tensor, coefficient: float) -> Tensor:
    """Apply the gradient reversal layer with coefficient λ_p."""
    return GradientReversal.apply(inputs, coefficient)


def grl_coefficient(
    epoch: int, batch_index: int, iterations_per_epoch: int, num_epochs: int
) -> float:
    """λ_p = 2/(1+exp(−p)) − 1 with p = (epoch·I + b)/(E·I) (spec §5.9).

    epoch and batch_index are 0-based, so p ∈ [0, 1) and λ_p ∈ [0, 0.462). The reference uses
    exp(−p), not standard DANN's exp(−10p).
    """
    progress = (epoch * iterations_per_epoch + batch_index) / (num_epochs * iterations_per_epoch)
    return 2.0 / (1.0 + math.exp(-progress)) - 1.0


class DomainClassifier(nn.Module):
    """D: a 1×1 conv C→1 with bias, then a sigmoid, applied to each sample row (spec §5.9)."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.fc = nn.Conv2d(feature_dim, 1, kernel_size=1, bias=True)
        # Reference initialization: xavier-uniform weight, zero bias.
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, rows: Tensor) -> Tensor:
        """rows: (M, C) sample vectors -> (M,) probabilities of the source domain."""
        logits = self.fc(rows[:, :, None, None])
        return torch.sigmoid(logits).flatten()


def domain_adversarial_loss(
    domain_classifier: DomainClassifier, source: Tensor, target: Tensor, coefficient: float
) -> Tensor:
    """L_d = 0.5·(BCE(D(S), 1) + BCE(D(T), 0)) through a GRL with λ_p (spec §5.9).

    source, target: (V, n, C) rows of the valid sets; every row is one sample. V = 0 gives a
    zero still in the graph (wsolbench decision of spec §5.5, applied by §5.9).
    """
    if source.dim() != 3 or target.dim() != 3 or source.shape[2] != target.shape[2]:
        raise ValueError(
            f"domain_adversarial_loss expects (V, n, C) source and target, got "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )
    # BCE on probabilities is not autocast-safe; the domain loss runs in float32.
    with torch.autocast(device_type=source.device.type, enabled=False):
        source_rows = source.reshape(-1, source.shape[2]).to(torch.float32)
        target_rows = target.reshape(-1, target.shape[2]).to(torch.float32)
        if source_rows.shape[0] == 0 or target_rows.shape[0] == 0:
            return (source_rows.sum() + target_rows.sum()) * 0.0
        source_probability = domain_classifier(reverse_gradient(source_rows, coefficient))
        target_probability = domain_classifier(reverse_gradient(target_rows, coefficient))
        source_loss = F.binary_cross_entropy(
            source_probability, torch.ones_like(source_probability)
        )
        target_loss = F.binary_cross_entropy(
            target_probability, torch.zeros_like(target_probability)
        )
        return 0.5 * (source_loss + target_loss)
