"""ADL, Attention-based Dropout Layer (spec §4.5): parameter-free layers inside the backbone.

In training each ADL layer multiplies its input X by one of two maps built from the channel mean
a of X: the importance map σ(a), or the drop mask 1[a < γ·max(a)] that hides the most
discriminative part. One draw per layer and forward pass picks the map for the whole batch. In
eval the layers are identity, so test time is CAM's (spec §3.4).

The layers sit at the three insert points of the backbone's "adl" variant (spec §4.5: ResNet
after layer3 block 0, layer4 block 0 and the end of layer4; VGG16 after pool3, conv4_3 and
conv5_3; InceptionV3 after Mixed_5d, Mixed_6e and SPG_A3_2b, with no dropout). Profile DA uses
the same positions with DA's classifier head and LR groups (the wsolbench decision of §4.5: DA's
own ADL model cannot load its weights). With DA-WSOL the target sample assigner sees the
ADL-modulated F (spec §5.8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wsolbench.errors import WsolbenchError
from wsolbench.methods.backbones import Backbone
from wsolbench.methods.base import WSOLMethod
from wsolbench.methods.registry import register_method

# Spec §4.7: the wsolevaluation code defaults (the Options hold DA's).
WE_DEFAULTS = {"drop_rate": 0.75, "gamma": 0.9}


def importance_map(attention: Tensor) -> Tensor:
    """σ(a) of the channel-mean map a (B, 1, h, w)."""
    return torch.sigmoid(attention)


def drop_mask(attention: Tensor, gamma: float) -> Tensor:
    """1 where a < γ·max_{h,w}(a) of that image, 0 elsewhere (spec §4.5).

    No min-max normalization: with a negative maximum the threshold lies above it and nothing
    is dropped, as in the reference.
    """
    peak = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    return (attention < gamma * peak).to(attention.dtype)


class ADLLayer(nn.Module):
    """The ADL layer (spec §4.5); identity in eval mode."""

    def __init__(self, drop_rate: float, gamma: float):
        super().__init__()
        self.drop_rate = drop_rate
        self.gamma = gamma

    def uses_drop_mask(self) -> bool:
        """Draw u ~ U[0,1) from torch's CPU generator: floor(u + drop_rate) == 1 picks the mask.

        Spec §4.5: one draw per layer per forward pass, shared by the whole batch; the float32
        sum is the reference's, so the choice matches it to the last bit.
        """
        u = torch.rand((), dtype=torch.float32, device="cpu")
        return bool(torch.floor(u + self.drop_rate) == 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        attention = x.mean(dim=1, keepdim=True)
        selected = drop_mask(attention, self.gamma) if self.uses_drop_mask() else importance_map(attention)
        return x * selected

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, gamma={self.gamma}"


@register_method
class ADL(WSOLMethod):
    """CAM on the "adl" backbone variant with an ADL layer at each of its insert points (spec §4.5)."""

    name = "adl"
    backbone_variant = "adl"

    @dataclass
    class Options:
        drop_rate: float = 0.59  # probability that a layer uses the drop mask. DA code default (spec §4.7)
        gamma: float = 0.99  # drop threshold as a fraction of each image's max. DA code default (spec §4.7)

        def __post_init__(self) -> None:
            if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate <= 1.0:
                raise WsolbenchError(f"adl option drop_rate must be a number in [0, 1], got {self.drop_rate!r}")
            if not isinstance(self.gamma, (int, float)):
                raise WsolbenchError(f"adl option gamma must be a number, got {self.gamma!r}")

    def __init__(self, backbone: Backbone, num_classes: int, profile: str = "DA", options: Any = None):
        super().__init__(backbone, num_classes, profile, options)
        place_adl_layers(backbone, self.options)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return dict(WE_DEFAULTS) if profile == "WE" else {}


def place_adl_layers(backbone: Backbone, options: ADL.Options) -> None:
    """Put an ADLLayer with `options` at every insert point of an "adl" backbone.

    The layers have no parameters or buffers, so the state dict, the pretrained load and the LR
    groups are those of the plain "adl" backbone.
    """
    if backbone.variant != "adl":
        raise WsolbenchError(f"method 'adl' needs the 'adl' variant of {backbone.name}, got {backbone.variant!r}")
    for point in backbone.insert_points:
        present = backbone.inserted[point] if point in backbone.inserted else None
        if present is not None and not isinstance(present, ADLLayer):
            raise WsolbenchError(f"{backbone.name} already holds a {type(present).__name__} at insert point "
                                 f"{point!r}, where ADL puts its layer")
        backbone.inserted[point] = ADLLayer(options.drop_rate, options.gamma)
