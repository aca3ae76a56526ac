"""SPG, Self-produced Guidance (spec §4.4; profile WE only, it is not in DA).

The trunk's class map M = SPG_A4(F) classifies (logits = GAP(M)) and localises (CAM = M[y], with
bias, spec §3.4). Three auxiliary one-channel maps learn pixel labels the network produces itself:

    B1 = SPG_B_shared(SPG_B_1a(tap SPG_A1))     B2 = SPG_B_shared(SPG_B_2a(tap SPG_A2))
    C  = SPG_C(F)
    attention = minmax(Up(M)[y])        fused = (σ(Up(B1)) + σ(Up(B2))) / 2
    loss = CE(GAP(M), y) + BCE(Up(B2), mask(attention; h1, l1))
                         + BCE(Up(B1), mask(σ(Up(B2)); h2, l2))
                         + BCE(Up(C),  mask(fused; h3, l3))

Up is bilinear upsampling (align_corners=False) to the input size (224 in the protocol); the
masks carry no gradient; 255 marks an ignored pixel. The method owns its classifier SPG_A4, so
the base class's ClassifierHead is removed. Under DA-WSOL (wsolbench extension, spec §5.8) F is
the input of SPG_A4, i.e. the trunk output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsolbench.methods.backbones import Backbone, initialize_weights
from wsolbench.methods.base import DomainTarget, StepOutput, TrainingProgress, WSOLMethod, minmax_per_map
from wsolbench.methods.registry import register_method

IGNORED = 255  # the label of a pixel no BCE term sees (spec §4.4)
MIN_SEED_PIXELS = 30  # below this many pixels above h, an image falls back to 0.7·max (spec §4.4)
FALLBACK_FRACTION = 0.7
# Width of the B-branch convs per family (spec §4.4); SPG_C's hidden width is 512 everywhere. On a
# narrower ResNet than ResNet50 both keep ResNet50's ratio to the trunk (Backbone.head_width).
B_BRANCH_CHANNELS = {"resnet": 1024, "vgg": 512, "inception": 512}
C_BRANCH_CHANNELS = 512


def _conv3x3_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Up(·): bilinear, align_corners=False, to the input size (spec §4.4)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def seed_mask(scores: Tensor, high: float, low: float) -> Tensor:
    """mask(a; h, l) (spec §4.4): 1 where a > h, 0 where a < l, IGNORED elsewhere, per image.

    scores: (B, H, W) or (B, 1, H, W). An image with fewer than 30 pixels above h uses
    0.7·max(a) as its foreground threshold instead. The background rule is applied last, so it
    wins where both hold. NaN scores (a constant map's min-max) stay IGNORED. No gradient.
    """
    scores = scores.detach()
    flat = scores.flatten(1)
    foreground = flat > high
    too_few = foreground.sum(dim=1) < MIN_SEED_PIXELS
    fallback = flat > FALLBACK_FRACTION * flat.max(dim=1, keepdim=True).values
    foreground = torch.where(too_few[:, None], fallback, foreground)
    mask = torch.full_like(flat, float(IGNORED))
    mask[foreground] = 1.0
    mask[flat < low] = 0.0
    return mask.view_as(scores)


def ignore_aware_bce(logits: Tensor, mask: Tensor) -> Tensor:
    """BCE-with-logits, the mean over the batch's non-ignored pixels (spec §4.4).

    Computed as (sum over labelled pixels) / (their count), without a host sync. wsolbench
    decision: a batch whose pixels are all ignored (only possible when every image's map is
    constant, hence NaN) gives 0 instead of the reference's mean of nothing (NaN).
    """
    labelled = mask != IGNORED
    targets = torch.where(labelled, mask, torch.zeros_like(mask)).to(logits.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weights = labelled.to(per_pixel.dtype)
    return (per_pixel * weights).sum() / weights.sum().clamp(min=1.0)


@register_method
class SPG(WSOLMethod):
    name = "spg"
    backbone_variant = "spg"
    profiles = ("WE",)  # SPG exists only in the wsolevaluation code (spec §4.4)

    @dataclass
    class Options:
        # (h_i, l_i) of the three masks; the WE code defaults (spec §4.7).
        h1: float = 0.7  # mask of the attention, supervises B2
        l1: float = 0.01
        h2: float = 0.5  # mask of σ(Up(B2)), supervises B1
        l2: float = 0.05
        h3: float = 0.7  # mask of the fused B1/B2 guidance, supervises SPG_C
        l3: float = 0.1

    def __init__(self, backbone: Backbone, num_classes: int, profile: str = "WE", options: Options | None = None):
        super().__init__(backbone, num_classes, profile, options)
        del self.head  # SPG classifies with its own SPG_A4 (spec §4.4)
        width = backbone.head_width(B_BRANCH_CHANNELS[backbone.family])
        c_width = backbone.head_width(C_BRANCH_CHANNELS)
        channels = backbone.out_channels
        self.SPG_B_1a = nn.Sequential(*_conv3x3_relu(backbone.tap_channels["SPG_A1"], width))
        self.SPG_B_2a = nn.Sequential(*_conv3x3_relu(backbone.tap_channels["SPG_A2"], width))
        # One module used by both B branches: B1 and B2 share these weights (spec §4.4).
        self.SPG_B_shared = nn.Sequential(*_conv3x3_relu(width, width), nn.Conv2d(width, 1, kernel_size=1))
        self.SPG_A4 = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.SPG_C = nn.Sequential(*_conv3x3_relu(channels, c_width), nn.Conv2d(c_width, 1, kernel_size=1))
        # Spec §3.1/§3.3: new layers are xavier-initialized.
        heads = (self.SPG_B_1a, self.SPG_B_2a, self.SPG_B_shared, self.SPG_A4, self.SPG_C)
        initialize_weights([module for head in heads for module in head.modules()], conv_init="xavier")

    @property
    def thresholds(self) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """((h1, l1), (h2, l2), (h3, l3))."""
        o = self.options
        return (o.h1, o.l1), (o.h2, o.l2), (o.h3, o.l3)

    def training_step(self, images: Tensor, labels: Tensor, progress: TrainingProgress) -> StepOutput:
        features, taps = self.backbone(images, taps=("SPG_A1", "SPG_A2"))
        class_maps = self.SPG_A4(features)
        logits = class_maps.mean(dim=(2, 3))
        b1 = self.SPG_B_shared(self.SPG_B_1a(taps["SPG_A1"]))
        b2 = self.SPG_B_shared(self.SPG_B_2a(taps["SPG_A2"]))
        c = self.SPG_C(features)
        guidance = self.guidance_losses(class_maps, b1, b2, c, labels, size=tuple(images.shape[-2:]))
        loss = F.cross_entropy(logits, labels) + sum(guidance.values())
        return StepOutput(loss=loss, logits=logits, features=features, source_features=features.mean(dim=(2, 3)),
                          domain_targets=[DomainTarget(labels)],
                          logs={name: float(value.detach()) for name, value in guidance.items()})

    def guidance_losses(self, class_maps: Tensor, b1: Tensor, b2: Tensor, c: Tensor, labels: Tensor,
                        size: tuple[int, int]) -> dict[str, Tensor]:
        """The three BCE terms of spec §4.4, by the map they supervise."""
        (h1, l1), (h2, l2), (h3, l3) = self.thresholds
        batch = torch.arange(class_maps.shape[0], device=class_maps.device)
        # Bilinear upsampling acts per channel, so taking the label's channel first is the same.
        selected = class_maps.detach()[batch, labels][:, None].float()  # float32 for the thresholds
        attention = minmax_per_map(upsample(selected, size)[:, 0])
        up_b1, up_b2, up_c = upsample(b1, size), upsample(b2, size), upsample(c, size)
        prob_b1, prob_b2 = torch.sigmoid(up_b1.detach()), torch.sigmoid(up_b2.detach())
        fused = (prob_b1 + prob_b2) / 2
        return {
            "spg_b2": ignore_aware_bce(up_b2, seed_mask(attention[:, None], h1, l1)),
            "spg_b1": ignore_aware_bce(up_b1, seed_mask(prob_b2, h2, l2)),
            "spg_c": ignore_aware_bce(up_c, seed_mask(fused, h3, l3)),
        }

    def logits(self, images: Tensor) -> Tensor:
        # Spec §8 item 19: classification from GAP(SPG_A4(F)); the B/C branches are training-only.
        return self.SPG_A4(self.backbone(images)[0]).mean(dim=(2, 3))

    def predict(self, images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """GAP(SPG_A4(F)) and the SPG_A4 map of `classes`, with bias (spec §3.4)."""
        class_maps = self.SPG_A4(self.backbone(images)[0])
        batch = torch.arange(class_maps.shape[0], device=class_maps.device)
        return class_maps.mean(dim=(2, 3)), class_maps[batch, classes]

    def lr_multiplier(self, name: str) -> float:
        if name.startswith("backbone."):
            return self.backbone.lr_multiplier(name[len("backbone."):], self.profile)
        if name.startswith("SPG_"):
            # Spec §3.1: WE's ResNet rule matches "layer4." and "fc." only, so the SPG heads
            # (SPG_A4 included) stay at ×1 (a quirk, reproduced); VGG (§3.2) and Inception (§3.3)
            # put all new layers at ×10.
            return 1.0 if self.backbone.family == "resnet" else 10.0
        raise KeyError(f"{type(self).__name__} has no learning-rate rule for parameter {name!r}")

    def load_pretrained_classifier(self) -> bool:
        return False  # spec §3.1: for spg the pretrained fc is dropped, never loaded
