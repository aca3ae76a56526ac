"""VGG16 backbone (spec §3.2; ACoL layout §4.3, SPG layout §4.4, ADL positions §4.5).

torchvision's 13 conv layers in a `features` Sequential with torchvision's indices, so the
IMAGENET1K_V1 file loads by name. A pool a variant removes is an nn.Identity placeholder that
keeps the numbering (this replaces the reference's "map conv weights by order" loader).

    variant  features (pools at torchvision indices 4, 9, 16, 23, 30)      after features   C
    cam/adl  2×2 pools; pool4 -> Identity with large_feature_map; no pool5  conv6 + ReLU   1024
    acol     3×3/s2/p1 pools; pool4 3×3/s1/p1 when large; pool5 3×3/s1/p1  3×3/s1/p1 avg   512
    spg      2×2 pools 1–3; pool4 3×3/s2/p1, Identity when large; no pool5  SPG_A_3        512
"""
from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG16_Weights

from wsolbench.methods.backbones import Backbone, initialize_weights, register_backbone

# Conv widths of VGG16 ("D"); "M" is a pool slot.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                 512, 512, 512, "M", 512, 512, 512, "M")
# torchvision indices in `features` (conv, ReLU, ..., pool).
_POOL_INDEX = {"pool1": 4, "pool2": 9, "pool3": 16, "pool4": 23, "pool5": 30}
_CONV4_3_RELU, _CONV5_3_RELU = 22, 29
# SPG re-homes conv4_x / conv5_x (indices 17–29) out of `features` in the reference, which puts
# them in the ×10 group under profile WE (spec §3.2).
_FIRST_CONV4_INDEX = 17


def _pool(kind: str) -> nn.Module:
    """The pool for a slot: "2x2", "3x3s2" (ACoL's M1), "3x3s1" (ACoL's M2) or "none"."""
    if kind == "2x2":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    if kind == "3x3s2":
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    if kind == "3x3s1":
        return nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    return nn.Identity()  # a removed pool; keeps torchvision's numbering


def _pool_kinds(variant: str, large_feature_map: bool) -> list[str]:
    """Pool 1–5 of each variant (spec §3.2, §4.3, §4.4)."""
    if variant == "acol":
        # M1 instead of 2×2, and a final M2; with the large map pool4 is an M2 as well.
        return ["3x3s2"] * 3 + ["3x3s1" if large_feature_map else "3x3s2", "3x3s1"]
    if variant == "spg":
        # pool4 is the 3×3/s2/p1 max-pool after SPG_A_1 (conv4_x), skipped with the large map.
        return ["2x2"] * 3 + ["none" if large_feature_map else "3x3s2", "none"]
    # cam / adl: pool5 removed (14×14); pool4 too with the large map (28×28).
    return ["2x2"] * 3 + ["none" if large_feature_map else "2x2", "none"]


def _vgg16_features(pool_kinds: list[str]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    pools = iter(pool_kinds)
    for width in _VGG16_LAYOUT:
        if width == "M":
            layers.append(_pool(next(pools)))
        else:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = width
    if pool_kinds[4] == "none":
        layers.pop()  # no pool5 at all: `features` ends with conv5_3's ReLU, as in the reference
    return nn.Sequential(*layers)


class WsolVgg16(Backbone):
    """VGG16 features plus the WSOL layers of each variant (spec §3.2)."""

    family = "vgg"
    imagenet_weight_url = VGG16_Weights.IMAGENET1K_V1.url

    def __init__(self, *, variant: str, large_feature_map: bool, insert: Mapping[str, nn.Module] | None):
        super().__init__(name="vgg16", variant=variant, large_feature_map=large_feature_map)
        self.features = _vgg16_features(_pool_kinds(variant, large_feature_map))
        self._tap_after_index: dict[int, str] = {}
        self._insert_after_index: dict[int, str] = {}
        if variant in ("cam", "adl"):
            self.conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=1)
            self.relu6 = nn.ReLU(inplace=True)
            self.out_channels = 1024
            self.new_layer_prefixes = ("conv6.",)
        elif variant == "acol":
            self.out_channels = 512  # F is the average-pooled conv5_3 map (spec §4.3)
        elif variant == "spg":
            # Spec §4.4: SPG_A_3 = two new 3×3 convs of 512, each followed by a ReLU.
            self.SPG_A_3 = nn.Sequential(
                nn.Conv2d(512, 512, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(512, 512, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            )
            self.out_channels = 512
            self.new_layer_prefixes = ("SPG_A_3.",)
            # B1 taps after conv4_x and its optional pool, B2 after conv5_x (spec §4.4).
            self.tap_names = ("SPG_A1", "SPG_A2")
            self.tap_channels = {"SPG_A1": 512, "SPG_A2": 512}
            self._tap_after_index = {_POOL_INDEX["pool4"]: "SPG_A1", _CONV5_3_RELU: "SPG_A2"}
        if variant == "adl":
            # Spec §4.5: after pool3, after conv4_3 + ReLU, after conv5_3 + ReLU.
            self.insert_points = ("pool3", "conv4_3", "conv5_3")
            self.insert_hosts = dict.fromkeys(self.insert_points, "features")
            self._insert_after_index = {_POOL_INDEX["pool3"]: "pool3", _CONV4_3_RELU: "conv4_3",
                                        _CONV5_3_RELU: "conv5_3"}
        # Spec §3.2: He for VGG; spec §4.3: the VGG-ACoL model is xavier-initialized as a whole.
        # SPG: its new SPG_* layers are xavier (as for Inception, spec §3.3) — see the report.
        initialize_weights(self.modules(), conv_init="he" if variant in ("cam", "adl") else "xavier")
        self._attach_inserted(insert)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        taps: dict[str, Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._insert_after_index:
                x = self._after(self._insert_after_index[index], x)
            if index in self._tap_after_index:
                taps[self._tap_after_index[index]] = x
        if self.variant in ("cam", "adl"):
            x = self.relu6(self.conv6(x))
        elif self.variant == "acol":
            x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)  # count_include_pad (§4.3)
        elif self.variant == "spg":
            x = self.SPG_A_3(x)
        return x, taps

    def _trunk_lr_multiplier(self, param_name: str, profile: str) -> float:
        if profile == "DA":
            # Spec §3.2 decision: profile DA on VGG16 follows DA24 as a whole: everything
            # outside `features.` (conv6 included) at ×10, like its zero-initialised classifier.
            return 1.0 if param_name.startswith("features.") else 10.0
        if param_name.startswith("features."):
            index = param_name.split(".")[1]  # a layer index, or an insert point's name
            if self.variant == "spg" and index.isdigit() and int(index) >= _FIRST_CONV4_INDEX:
                return 10.0  # spec §3.2: SPG's re-homed conv4/conv5 train at ×10
            return 1.0
        return 10.0  # conv6, SPG_A_3 (spec §3.2: everything but features.* at ×10)


@register_backbone
def vgg16(*, variant: str, large_feature_map: bool, insert: Mapping[str, nn.Module] | None) -> WsolVgg16:
    """VGG16 conv layers (spec §3.2)."""
    return WsolVgg16(variant=variant, large_feature_map=large_feature_map, insert=insert)
