"""InceptionV3 backbone (spec §3.3; ACoL §4.3, SPG taps §4.4, ADL positions §4.5).

torchvision's InceptionV3 blocks up to Mixed_6e, modified as the reference does:
- Conv2d_1a is 3×3 stride 2 with padding 1;
- both early max-pools are 3×3 s2 with padding 1 and ceil_mode;
- without `large_feature_map`, an extra 3×3 s2 ceil_mode max-pool (no padding) after Mixed_5d;
- Mixed_6a (InceptionB) has stride 1 and padding 1 on its convs and its pool;
- Mixed_7*, AuxLogits and fc are gone; BN eps 0.001 (torchvision's BasicConv2d);
- no `transform_input`: the input is ImageNet-normalized (spec §8 item 11).
F is 28×28 (large) or 14×14 at 224 px. Module names are torchvision's, so the "google" file
loads by name.

    variant  after Mixed_6e                                                      C
    cam/spg  dropout, SPG_A3_1b (conv+ReLU), dropout, SPG_A3_2b (conv+ReLU), dropout   1024
    adl      SPG_A3_1b, SPG_A3_2b, no dropout anywhere (spec §4.5)                    1024
    acol     nothing: F is the Mixed_6e output, no dropout (spec §4.3)                 768
"""
from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import Inception_V3_Weights
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC

from wsolbench.methods.backbones import Backbone, initialize_weights, register_backbone

# Spec §3.1–3.3 profile rules: names containing these substrings are pretrained, at ×1.
_PRETRAINED_NAME_PARTS = ("Mixed", "Conv2d_1", "Conv2d_2", "Conv2d_3", "Conv2d_4")


class InceptionBStride1(InceptionB):
    """Mixed_6a with stride 1 and padding 1 (spec §3.3), so the map keeps its size.

    Same submodule names and shapes as torchvision's InceptionB: the pretrained weights fit.
    """

    def __init__(self, in_channels: int):
        super().__init__(in_channels)
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=1, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=1, padding=1)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return [branch3x3, branch3x3dbl, branch_pool]


def _early_max_pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)


class WsolInceptionV3(Backbone):
    """InceptionV3 up to Mixed_6e plus the WSOL layers of each variant (spec §3.3)."""

    family = "inception"
    imagenet_weight_url = Inception_V3_Weights.IMAGENET1K_V1.url

    def __init__(self, *, variant: str, large_feature_map: bool, insert: Mapping[str, nn.Module] | None):
        super().__init__(name="inception_v3", variant=variant, large_feature_map=large_feature_map)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2, padding=1)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = _early_max_pool()
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = _early_max_pool()
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.pool_after_5d = (nn.Identity() if large_feature_map
                              else nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        self.Mixed_6a = InceptionBStride1(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)

        self.has_spg_a3 = variant != "acol"
        self.dropout = nn.Dropout(0.5) if variant in ("cam", "spg") else None
        if self.has_spg_a3:
            self.SPG_A3_1b = nn.Sequential(nn.Conv2d(768, 1024, kernel_size=3, padding=1),
                                           nn.ReLU(inplace=True))
            self.SPG_A3_2b = nn.Sequential(nn.Conv2d(1024, 1024, kernel_size=3, padding=1),
                                           nn.ReLU(inplace=True))
            self.new_layer_prefixes = ("SPG_A3_1b.", "SPG_A3_2b.")
            self.out_channels = 1024
        else:
            self.out_channels = 768
        if variant == "spg":
            # Spec §4.4: B1 taps Mixed_5d after the optional pool, B2 taps Mixed_6d.
            self.tap_names = ("SPG_A1", "SPG_A2")
            self.tap_channels = {"SPG_A1": 288, "SPG_A2": 768}
        if variant == "adl":
            # Spec §4.5: after Mixed_5d (before its optional pool; the SPG tap is after it),
            # after Mixed_6e, after SPG_A3_2b + ReLU.
            self.insert_points = ("Mixed_5d", "Mixed_6e", "SPG_A3_2b")
            self.insert_hosts = {point: point for point in self.insert_points}
        # Spec §3.3: new layers xavier; the reference initializes the whole model so, then loads.
        initialize_weights(self.modules(), conv_init="xavier")
        self._attach_inserted(insert)

    def _drop(self, x: Tensor) -> Tensor:
        return x if self.dropout is None else self.dropout(x)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.maxpool1(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = self.maxpool2(x)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.pool_after_5d(self._after("Mixed_5d", x))  # spec §4.5: ADL_5d precedes the pool
        taps = {"SPG_A1": x}  # spec §4.4: B1 taps after the pool
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x))))
        taps["SPG_A2"] = x
        x = self._after("Mixed_6e", self.Mixed_6e(x))
        if not self.has_spg_a3:
            return x, taps
        # Spec §3.3: dropout(0.5) after Mixed_6e and after each SPG_A3 conv (not for ADL).
        x = self._drop(self.SPG_A3_1b(self._drop(x)))
        x = self._after("SPG_A3_2b", self.SPG_A3_2b(x))
        return self._drop(x), taps

    def _trunk_lr_multiplier(self, param_name: str, profile: str) -> float:
        # Spec §3.3: the same rule in both profiles (the DA classifier, not ours, is ×10).
        return 1.0 if any(part in param_name for part in _PRETRAINED_NAME_PARTS) else 10.0


@register_backbone
def inception_v3(*, variant: str, large_feature_map: bool,
                 insert: Mapping[str, nn.Module] | None) -> WsolInceptionV3:
    """Modified InceptionV3 (spec §3.3)."""
    return WsolInceptionV3(variant=variant, large_feature_map=large_feature_map, insert=insert)
