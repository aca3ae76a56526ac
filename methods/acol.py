"""ACoL, Adversarial Complementary Learning (spec §4.3; profile WE only, it is not in DA).

Two identical heads on the trunk's feature map F. Branch A classifies F; the positions its map
of the label finds most discriminative (min-max attention >= δ) are erased from F, and branch B
classifies what is left, so it has to find the complementary object parts:

    M_A = A(F)            logits = GAP(M_A)                  (classification, spec §8 item 19)
    attention = minmax(M_A[y]).detach()                      (per image, at feature resolution)
    M_B = B(F ⊙ 1[attention < δ])    loss = CE(GAP(M_A), y) + CE(GAP(M_B), y)
    CAM_y = max(minmax(M_A[y]), minmax(M_B[y]))              (spec §3.4; the GT label erases at test too)

The method owns both heads, so the base class's ClassifierHead is removed. Under DA-WSOL
(wsolbench extension, spec §5.8) F is branch A's hidden (1024-channel) activation after its
second ReLU, the input of its final 1×1 conv, and z = GAP(F).

The heads are 1024 wide on the spec's backbones; on a narrower ResNet (resnet18, resnet10_half) they
keep ResNet50's ratio C/2 (`Backbone.head_width`, a wsolbench decision).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsolbench.methods.backbones import Backbone, initialize_weights
from wsolbench.methods.base import DomainTarget, StepOutput, TrainingProgress, WSOLMethod, minmax_per_map
from wsolbench.methods.registry import register_method

HIDDEN_CHANNELS = 1024  # width of both ACoL heads on the spec's backbones (§4.3)


class AcolBranch(nn.Module):
    """One ACoL head: 3×3 conv C→W + ReLU, 3×3 conv W→W + ReLU, 1×1 conv W→K (W = 1024, §4.3)."""

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = HIDDEN_CHANNELS):
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(hidden_channels, num_classes, kernel_size=1)

    @property
    def hidden_channels(self) -> int:
        return self.classifier.in_channels

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden activation (B, W, h, w), class maps (B, K, h, w))."""
        hidden = self.hidden(features)
        return hidden, self.classifier(hidden)


def select_class(class_maps: Tensor, classes: Tensor) -> Tensor:
    """The map of one class per image: (B, K, h, w), (B,) -> (B, h, w)."""
    return class_maps[torch.arange(class_maps.shape[0], device=class_maps.device), classes]


def class_attention(class_maps: Tensor, classes: Tensor) -> Tensor:
    """minmax(M[y]) per image, detached (B, h, w) (spec §4.3).

    A constant map gives NaN (0/0, as the reference's normalisation has no epsilon); NaN is never
    >= δ, so such an image is not erased.
    """
    # float32 so the >= δ test does not depend on autocast's precision
    return minmax_per_map(select_class(class_maps.detach(), classes).float())


def erase_attended(features: Tensor, attention: Tensor, threshold: float) -> Tensor:
    """F ⊙ mask, the mask 0 where attention >= δ and 1 elsewhere, broadcast over channels (§4.3)."""
    erased = attention >= threshold  # written as ">= δ", not "< δ": NaN positions are kept
    return features * (~erased).unsqueeze(1).to(features.dtype)


@register_method
class ACoL(WSOLMethod):
    name = "acol"
    backbone_variant = "acol"
    profiles = ("WE",)  # ACoL exists only in the wsolevaluation code (spec §4.3)

    @dataclass
    class Options:
        erase_threshold: float = 0.7  # δ_acol; the WE code default (spec §4.7; DA's config: 0.57)

    def __init__(self, backbone: Backbone, num_classes: int, profile: str = "WE", options: Options | None = None):
        super().__init__(backbone, num_classes, profile, options)
        del self.head  # ACoL classifies with its own branch A (spec §4.3)
        hidden = backbone.head_width(HIDDEN_CHANNELS)
        self.branch_a = AcolBranch(backbone.out_channels, num_classes, hidden)
        self.branch_b = AcolBranch(backbone.out_channels, num_classes, hidden)
        # Spec §4.3: He for ResNet-ACoL, xavier for VGG/Inception (the trunk loads over its init).
        conv_init = "he" if backbone.family == "resnet" else "xavier"
        initialize_weights(list(self.branch_a.modules()) + list(self.branch_b.modules()), conv_init=conv_init)

    @property
    def feature_channels(self) -> int:
        """C of the map DA-WSOL aligns: branch A's hidden activation (spec §5.8)."""
        return self.branch_a.hidden_channels

    def _branches(self, images: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Branch A's hidden activation and class maps, branch B's maps on the erased F, and the
        classes that erased (the given ones, or branch A's prediction when None, spec §4.3)."""
        features = self.backbone(images)[0]
        hidden_a, maps_a = self.branch_a(features)
        if classes is None:
            classes = maps_a.mean(dim=(2, 3)).argmax(dim=1)
        erased = erase_attended(features, class_attention(maps_a, classes), self.options.erase_threshold)
        maps_b = self.branch_b(erased)[1]
        return hidden_a, maps_a, maps_b, classes

    def training_step(self, images: Tensor, labels: Tensor, progress: TrainingProgress) -> StepOutput:
        hidden_a, maps_a, maps_b, _ = self._branches(images, labels)
        logits_a = maps_a.mean(dim=(2, 3))
        logits_b = maps_b.mean(dim=(2, 3))
        loss = F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)
        return StepOutput(loss=loss, logits=logits_a, features=hidden_a, source_features=hidden_a.mean(dim=(2, 3)),
                          domain_targets=[DomainTarget(labels)])

    def logits(self, images: Tensor) -> Tensor:
        # Branch B does not change branch A's logits, so classification skips it (spec §8 item 19).
        return self.branch_a(self.backbone(images)[0])[1].mean(dim=(2, 3))

    def predict(self, images: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor]:
        """Branch A's logits and max(minmax(A_y), minmax(B_y)) (spec §3.4), y = `classes` (the GT
        in the protocol) both for the erasing and the map; None: branch A's predicted class."""
        _, maps_a, maps_b, classes = self._branches(images, classes)
        cams = torch.maximum(minmax_per_map(select_class(maps_a, classes).float()),
                             minmax_per_map(select_class(maps_b, classes).float()))
        return maps_a.mean(dim=(2, 3)), cams

    def lr_multiplier(self, name: str) -> float:
        if name.startswith("backbone."):
            return self.backbone.lr_multiplier(name[len("backbone."):], self.profile)
        if name.startswith(("branch_a.", "branch_b.")):
            # Spec §3.1: WE's ResNet rule matches "layer4." and "fc." only, so the ACoL heads stay
            # at ×1 (a quirk, reproduced); VGG (§3.2) and Inception (§3.3) put all new layers at ×10.
            return 1.0 if self.backbone.family == "resnet" else 10.0
        raise KeyError(f"{type(self).__name__} has no learning-rate rule for parameter {name!r}")

    def load_pretrained_classifier(self) -> bool:
        return False  # spec §3.1: for acol the pretrained fc is dropped, never loaded
