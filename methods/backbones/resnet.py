"""ResNet backbones (spec §3.1; SPG taps §4.4, ADL positions §4.5).

torchvision's ResNet with WSOL strides: layer4 stride 1; layer3 stride 2, or 1 with
`large_feature_map`. F is the layer4 output: 14×14 or 28×28 at 224 px. The same trunk serves
every variant; "spg" adds taps, "adl" adds insert points. Module names are torchvision's, so the
IMAGENET1K_V1 files load unchanged (stride changes do not alter shapes).

resnet18 (BasicBlock, C = 512) is not in the spec: it is a small stand-in for quick CPU runs.
resnet10_half (BasicBlock [1, 1, 1, 1] at half width, C = 256) is not in the spec either: the
backbone of the embedded default, small enough to pretrain and fine-tune on two CPU cores with
16×16 feature maps (wsolbench's own weights only; there is no ImageNet file for it).
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights
from torchvision.models.resnet import BasicBlock, Bottleneck

from wsolbench.methods.backbones import Backbone, initialize_weights, register_backbone

ResidualBlock = type[BasicBlock] | type[Bottleneck]


def _make_stage(block: ResidualBlock, in_channels: int, width: int, depth: int, stride: int) -> nn.Sequential:
    """One torchvision stage; the first block gets a 1×1 conv + BN shortcut when shapes change.

    Spec §3.1: layer4 at stride 1 keeps that shortcut because channels still change.
    """
    out_channels = width * block.expansion
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    blocks = [block(in_channels, width, stride, shortcut)]
    blocks += [block(out_channels, width) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


RESNET50_OUT_CHANNELS = 2048  # C of the spec's ResNet (§3.1)


class WsolResNet(Backbone):
    """conv1 … layer4 of a torchvision ResNet, with the WSOL strides (spec §3.1)."""

    family = "resnet"
    pretrained_fc_prefix = "fc."  # the 1000-class fc, loaded by profile WE on ILSVRC (§3.1)

    def __init__(
        self,
        *,
        name: str,
        block: ResidualBlock,
        depths: tuple[int, int, int, int],
        imagenet_weight_url: str,
        variant: str,
        width: int = 64,
        large_feature_map: bool,
        insert: Mapping[str, nn.Module] | None,
    ):
        super().__init__(name=name, variant=variant, large_feature_map=large_feature_map)
        self.imagenet_weight_url = imagenet_weight_url
        expansion = block.expansion
        w = width  # torchvision's 64; the stages double it: w, 2w, 4w, 8w
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_stage(block, w, w, depths[0], stride=1)
        self.layer2 = _make_stage(block, w * expansion, 2 * w, depths[1], stride=2)
        self.layer3 = _make_stage(block, 2 * w * expansion, 4 * w, depths[2],
                                  stride=1 if large_feature_map else 2)
        self.layer4 = _make_stage(block, 4 * w * expansion, 8 * w, depths[3], stride=1)
        self.out_channels = 8 * w * expansion
        # The spec's ResNet is ResNet50 (C = 2048); ACoL/SPG heads scale with C (Backbone.head_width).
        self.head_width_scale = self.out_channels / RESNET50_OUT_CHANNELS

        if variant == "spg":
            # Spec §4.4: the reference splits layer3 into SPG_A1 (block 0) and SPG_A2 (the rest);
            # here layer3 stays whole and the two outputs are taps.
            self.tap_names = ("SPG_A1", "SPG_A2")
            self.tap_channels = {"SPG_A1": 4 * w * expansion, "SPG_A2": 4 * w * expansion}
        if variant == "adl":
            # Spec §4.5: after layer3 block 0, after layer4 block 0, after the end of layer4.
            self.insert_points = ("layer3_block0", "layer4_block0", "layer4_end")
            self.insert_hosts = {"layer3_block0": "layer3", "layer4_block0": "layer4",
                                 "layer4_end": "layer4"}
        # Spec §3.1: xavier; spec §4.3: the ResNet-ACoL model is He-initialized as a whole.
        initialize_weights(self.modules(), conv_init="he" if variant == "acol" else "xavier")
        self._attach_inserted(insert)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        taps: dict[str, Tensor] = {}
        for index, block in enumerate(self.layer3):
            x = block(x)
            if index == 0:
                x = self._after("layer3_block0", x)
                taps["SPG_A1"] = x
        taps["SPG_A2"] = x
        for index, block in enumerate(self.layer4):
            x = block(x)
            if index == 0:
                x = self._after("layer4_block0", x)
        x = self._after("layer4_end", x)
        return x, taps

    def _trunk_lr_multiplier(self, param_name: str, profile: str) -> float:
        if profile == "DA":
            return 1.0  # spec §3.1: the whole extractor at ×1; only the classifier at ×10
        # Spec §3.1, profile WE: the reference matches the substring "layer4." (and "fc.").
        return 10.0 if "layer4." in param_name else 1.0


@register_backbone
def resnet50(*, variant: str, large_feature_map: bool, insert: Mapping[str, nn.Module] | None) -> WsolResNet:
    """ResNet50 (Bottleneck [3, 4, 6, 3]), C = 2048 (spec §3.1)."""
    return WsolResNet(name="resnet50", block=Bottleneck, depths=(3, 4, 6, 3),
                      imagenet_weight_url=ResNet50_Weights.IMAGENET1K_V1.url,
                      variant=variant, large_feature_map=large_feature_map, insert=insert)


@register_backbone
def resnet18(*, variant: str, large_feature_map: bool, insert: Mapping[str, nn.Module] | None) -> WsolResNet:
    """ResNet18 (BasicBlock [2, 2, 2, 2]), C = 512; not in the spec, for quick CPU runs."""
    return WsolResNet(name="resnet18", block=BasicBlock, depths=(2, 2, 2, 2),
                      imagenet_weight_url=ResNet18_Weights.IMAGENET1K_V1.url,
                      variant=variant, large_feature_map=large_feature_map, insert=insert)


@register_backbone
def resnet10_half(*, variant: str, large_feature_map: bool, insert: Mapping[str, nn.Module] | None) -> WsolResNet:
    """ResNet10 (BasicBlock [1, 1, 1, 1]) at half width, C = 256; not in the spec: the embedded
    default's backbone, pretrained by `wsolbench pretrain` on the generated source task."""
    return WsolResNet(name="resnet10_half", block=BasicBlock, depths=(1, 1, 1, 1),
                      imagenet_weight_url="", variant=variant, large_feature_map=large_feature_map,
                      insert=insert, width=32)
