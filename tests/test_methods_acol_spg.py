"""ACoL (spec §4.3) and SPG (spec §4.4): erasing, seed masks, losses, test CAMs, LR groups, DA-WSOL."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from wsolbench.config import resolve_config
from wsolbench.experiment import build_model
from wsolbench.methods.acol import ACoL, class_attention, erase_attended
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.base import TrainingProgress, WSOLMethod
from wsolbench.methods.dawsol.wrapper import DomainAdaptation, DomainAdaptationOptions
from wsolbench.methods.registry import method_class
from wsolbench.methods.spg import IGNORED, SPG, ignore_aware_bce, seed_mask

NUM_CLASSES = 4
SMALL = 32  # px: a 4×4 feature map on every family (large_feature_map)
TRAIN_PIXELS = 40  # px: 5×5 on ResNet, with an upsampling that is not a plain 8× copy


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(torch_threads):
    """Small tensors: 2 torch thread(s) (conftest.torch_threads)."""
    yield from torch_threads(2)


def build(cls: type[WSOLMethod], backbone: str, seed: int = 0, **options) -> WSOLMethod:
    torch.manual_seed(seed)
    trunk = build_backbone(backbone, variant=cls.backbone_variant, pretrained="none")
    return cls(trunk, NUM_CLASSES, "WE", cls.Options(**options))


@lru_cache(maxsize=None)
def built_for_reading(cls: type[WSOLMethod], backbone: str) -> WSOLMethod:
    """A shared model for tests that only read it (shapes, LR groups); never trained."""
    return build(cls, backbone).eval()


def batch(size: int = 2, pixels: int = SMALL, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, pixels, pixels, generator=generator)
    labels = torch.arange(size) % NUM_CLASSES
    return images, labels


class Recorder:
    """Forward hooks keeping each call's input and output of some submodules."""

    def __init__(self, **modules: torch.nn.Module):
        self.inputs: dict[str, list] = {name: [] for name in modules}
        self.outputs: dict[str, list] = {name: [] for name in modules}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def keep(module, inputs, output):
            self.inputs[name].append(inputs[0].detach().clone())
            self.outputs[name].append(tuple(_kept(item) for item in output) if isinstance(output, tuple)
                                      else _kept(output))
        return keep

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _kept(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def minmax(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low)


def test_methods_are_registered_by_name_with_the_we_profile_only():
    assert method_class("acol") is ACoL and method_class("spg") is SPG
    assert ACoL.profiles == ("WE",) and SPG.profiles == ("WE",)
    assert ACoL.Options().erase_threshold == 0.7  # spec §4.7, WE default
    spg = SPG.Options()
    assert (spg.h1, spg.l1, spg.h2, spg.l2, spg.h3, spg.l3) == (0.7, 0.01, 0.5, 0.05, 0.7, 0.1)


# ----------------------------------------------------------------------------------------------
# ACoL (spec §4.3)

def test_acol_erases_positions_whose_min_max_attention_of_the_label_reaches_delta():
    # Image 0 uses class 1, image 1 class 0: the other class's map must not matter.
    maps = torch.zeros(2, 2, 2, 3)
    maps[0, 1] = torch.tensor([[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]])  # minmax: 0 .2 .4 / .6 .8 1
    maps[0, 0] = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    maps[1, 0] = torch.tensor([[5.0, 1.0, 1.0], [1.0, 1.0, 3.0]])  # minmax: 1 0 0 / 0 0 .5
    maps[1, 1] = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 7.0]])
    attention = class_attention(maps, torch.tensor([1, 0]))
    torch.testing.assert_close(attention, torch.tensor([[[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]],
                                                        [[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]]))
    features = torch.ones(2, 3, 2, 3)
    erased = erase_attended(features, attention, threshold=0.5)
    kept = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
                         [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]])  # >= δ erased: 0.5 itself included
    torch.testing.assert_close(erased, kept[:, None].expand(2, 3, 2, 3))


def test_acol_constant_attention_is_nan_and_erases_nothing():
    # 0/0 as in the reference's normalisation; NaN >= δ is false, so the image keeps all of F.
    attention = class_attention(torch.full((1, 1, 2, 2), 3.0), torch.tensor([0]))
    assert torch.isnan(attention).all()
    torch.testing.assert_close(erase_attended(torch.ones(1, 2, 2, 2), attention, 0.7), torch.ones(1, 2, 2, 2))


def test_acol_training_step_feeds_branch_b_the_erased_map_and_sums_both_cross_entropies():
    model = build(ACoL, "resnet18", erase_threshold=0.6).train()
    images, labels = batch()
    recorder = Recorder(backbone=model.backbone, branch_a=model.branch_a, branch_b=model.branch_b)
    out = model.training_step(images, labels, TrainingProgress())
    recorder.close()
    features = recorder.outputs["backbone"][0][0]
    hidden_a, maps_a = recorder.outputs["branch_a"][0]
    maps_b = recorder.outputs["branch_b"][0][1]
    # Branch B sees F with the GT-label attention >= δ zeroed, broadcast over channels.
    attention = minmax(maps_a[torch.arange(2), labels])
    expected_input = features * (attention < 0.6)[:, None]
    torch.testing.assert_close(recorder.inputs["branch_b"][0], expected_input)
    erased_fraction = (attention >= 0.6).float().mean()
    assert 0.0 < erased_fraction < 1.0
    logits_a, logits_b = maps_a.mean(dim=(2, 3)), maps_b.mean(dim=(2, 3))
    torch.testing.assert_close(out.logits.detach(), logits_a)
    torch.testing.assert_close(out.loss.detach(), F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels))
    # DA-WSOL reads branch A's hidden activation before its 1×1 conv (spec §5.8).
    assert out.features.shape == (2, model.feature_channels, 4, 4)
    torch.testing.assert_close(out.features.detach(), hidden_a)
    torch.testing.assert_close(out.source_features.detach(), hidden_a.mean(dim=(2, 3)))
    out.loss.backward()
    assert model.branch_b.classifier.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_acol_test_cam_is_the_max_of_the_two_min_maxed_branch_maps_erased_with_the_given_class():
    model = build(ACoL, "resnet18", seed=2).eval()
    images, _ = batch(seed=3)
    classes = torch.tensor([2, 3])
    recorder = Recorder(branch_a=model.branch_a, branch_b=model.branch_b, backbone=model.backbone)
    with torch.no_grad():
        logits, cams = model.predict(images, classes)
        plain_logits = model.logits(images)
    recorder.close()
    maps_a = recorder.outputs["branch_a"][0][1]
    maps_b = recorder.outputs["branch_b"][0][1]
    index = torch.arange(2)
    attention = minmax(maps_a[index, classes])  # the given (GT) class erases at test too (§3.4)
    torch.testing.assert_close(recorder.inputs["branch_b"][0],
                               recorder.outputs["backbone"][0][0] * (attention < 0.7)[:, None])
    expected = torch.maximum(minmax(maps_a[index, classes]), minmax(maps_b[index, classes]))
    assert cams.shape == (2, 4, 4)
    torch.testing.assert_close(cams, expected)
    # Classification is branch A's GAP (spec §8 item 19), with or without the CAM pass.
    torch.testing.assert_close(logits, maps_a.mean(dim=(2, 3)))
    torch.testing.assert_close(plain_logits, logits)
    # Without labels the erasing and the map use branch A's predicted class (spec §4.3).
    with torch.no_grad():
        unlabelled = model.predict(images, None)[1]
        predicted = model.predict(images, logits.argmax(dim=1))[1]
    torch.testing.assert_close(unlabelled, predicted)


# ----------------------------------------------------------------------------------------------
# SPG (spec §4.4)

def test_spg_seed_mask_thresholds_ignore_and_per_image_fallback():
    scores = torch.zeros(2, 8, 8)
    # Image 0: 32 pixels above h = 0.7 (enough), 16 in between, 16 below l = 0.1.
    scores[0, :4] = 0.8
    scores[0, 4:6] = 0.5
    scores[0, 6:] = 0.05
    scores[0, 0, 0] = 0.7  # exactly h: not foreground (strict >)
    scores[0, 7, 7] = 0.1  # exactly l: not background (strict <)
    # Image 1: only 3 pixels above h, so its threshold becomes 0.7 * max = 0.63.
    scores[1] = 0.3
    scores[1, 0, :3] = torch.tensor([0.9, 0.8, 0.75])
    scores[1, 1, :4] = torch.tensor([0.65, 0.64, 0.63, 0.6])  # > 0.63 -> 1 (two of them)
    scores[1, 2, 0] = 0.02  # below l
    mask = seed_mask(scores, high=0.7, low=0.1)

    expected = torch.full((2, 8, 8), float(IGNORED))
    expected[0, :4] = 1.0
    expected[0, 0, 0] = IGNORED
    expected[0, 6:] = 0.0
    expected[0, 7, 7] = IGNORED
    expected[1, 0, :3] = 1.0
    expected[1, 1, :2] = 1.0
    expected[1, 2, 0] = 0.0
    torch.testing.assert_close(mask, expected)


def test_spg_seed_mask_background_rule_wins_and_constant_maps_are_ignored():
    # A dim map (max 0.04 < l): the fallback marks > 0.028 as 1, then "< l" overrides to 0.
    dim = torch.full((1, 1, 6, 6), 0.01)
    dim[..., 0, 0] = 0.04
    assert (seed_mask(dim, high=0.7, low=0.05) == 0).all()
    # A NaN attention (min-max of a constant map) is neither above h nor below l.
    assert (seed_mask(torch.full((1, 1, 6, 6), float("nan")), 0.7, 0.05) == IGNORED).all()


def test_spg_bce_is_the_mean_over_non_ignored_pixels_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 5, requires_grad=True)
    mask = torch.randint(0, 2, (2, 1, 5, 5)).float()
    mask[0, 0, :2] = IGNORED
    mask[1, 0, 4] = IGNORED
    loss = ignore_aware_bce(logits, mask)
    labelled = mask != IGNORED
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[labelled], mask[labelled]))
    loss.backward()
    assert (logits.grad[~labelled] == 0).all() and (logits.grad[labelled] != 0).all()
    # wsolbench decision (spec §0): a batch with nothing labelled adds 0, not NaN.
    assert ignore_aware_bce(logits, torch.full_like(mask, IGNORED)).item() == 0.0


def reference_mask(scores: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """mask(a; h, l) written as the spec's per-image steps, for comparison."""
    mask = torch.full_like(scores, float(IGNORED))
    for b in range(scores.shape[0]):
        foreground = scores[b] > high
        if int(foreground.sum()) < 30:
            foreground = scores[b] > 0.7 * scores[b].max()
        mask[b][foreground] = 1.0
    mask[scores < low] = 0.0
    return mask


def test_spg_training_step_loss_is_cross_entropy_plus_the_three_guidance_terms():
    model = build(SPG, "resnet18").train()
    images, labels = batch(pixels=TRAIN_PIXELS)
    recorder = Recorder(shared=model.SPG_B_shared, b1a=model.SPG_B_1a, b2a=model.SPG_B_2a,
                        class_map=model.SPG_A4, c=model.SPG_C, backbone=model.backbone)
    out = model.training_step(images, labels, TrainingProgress())
    recorder.close()
    # One shared module, called once for B1 (on SPG_B_1a's output) and once for B2.
    assert len(recorder.outputs["shared"]) == 2
    torch.testing.assert_close(recorder.inputs["shared"][0], recorder.outputs["b1a"][0])
    torch.testing.assert_close(recorder.inputs["shared"][1], recorder.outputs["b2a"][0])
    b1, b2 = recorder.outputs["shared"]
    class_maps, c = recorder.outputs["class_map"][0], recorder.outputs["c"][0]

    def up(maps):
        return F.interpolate(maps, size=(TRAIN_PIXELS, TRAIN_PIXELS), mode="bilinear", align_corners=False)

    attention = minmax(up(class_maps)[torch.arange(2), labels])[:, None]
    fused = (torch.sigmoid(up(b1)) + torch.sigmoid(up(b2))) / 2
    (h1, l1), (h2, l2), (h3, l3) = (0.7, 0.01), (0.5, 0.05), (0.7, 0.1)

    def bce(logits, mask):
        labelled = mask != IGNORED
        return F.binary_cross_entropy_with_logits(logits[labelled], mask[labelled])

    logits = class_maps.mean(dim=(2, 3))
    expected = (F.cross_entropy(logits, labels) + bce(up(b2), reference_mask(attention, h1, l1))
                + bce(up(b1), reference_mask(torch.sigmoid(up(b2)), h2, l2))
                + bce(up(c), reference_mask(fused, h3, l3)))
    torch.testing.assert_close(out.loss.detach(), expected)
    torch.testing.assert_close(out.logits.detach(), logits)
    # DA-WSOL reads the input of SPG_A4 (spec §5.8).
    features = recorder.inputs["class_map"][0]
    assert out.features.shape == (2, model.backbone.out_channels, 5, 5)
    torch.testing.assert_close(out.features.detach(), features)
    torch.testing.assert_close(out.source_features.detach(), features.mean(dim=(2, 3)))
    out.loss.backward()
    for weight in (model.SPG_B_shared[0].weight, model.SPG_B_1a[0].weight, model.SPG_B_2a[0].weight,
                   model.SPG_C[0].weight, model.SPG_A4.weight):
        assert weight.grad.abs().sum() > 0


def test_spg_shared_branch_is_one_set_of_weights_trained_by_both_b_terms():
    model = build(SPG, "resnet18", seed=4).train()
    names = [name for name, _ in model.named_parameters() if "SPG_B" in name]
    assert sorted(names) == sorted(f"{m}.{p}" for m, p in [
        ("SPG_B_1a", "0.weight"), ("SPG_B_1a", "0.bias"), ("SPG_B_2a", "0.weight"), ("SPG_B_2a", "0.bias"),
        ("SPG_B_shared", "0.weight"), ("SPG_B_shared", "0.bias"),
        ("SPG_B_shared", "2.weight"), ("SPG_B_shared", "2.bias")])
    # Each B term alone sends gradient into the shared weights.
    images, labels = batch(pixels=TRAIN_PIXELS)
    features, taps = model.backbone(images, taps=("SPG_A1", "SPG_A2"))
    b1 = model.SPG_B_shared(model.SPG_B_1a(taps["SPG_A1"]))
    b2 = model.SPG_B_shared(model.SPG_B_2a(taps["SPG_A2"]))
    losses = model.guidance_losses(model.SPG_A4(features), b1, b2, model.SPG_C(features), labels,
                                   size=(TRAIN_PIXELS, TRAIN_PIXELS))
    for term in ("spg_b1", "spg_b2"):
        model.zero_grad()
        losses[term].backward(retain_graph=True)
        assert model.SPG_B_shared[2].weight.grad.abs().sum() > 0, term
        own_branch = model.SPG_B_1a if term == "spg_b1" else model.SPG_B_2a
        other_branch = model.SPG_B_2a if term == "spg_b1" else model.SPG_B_1a
        assert own_branch[0].weight.grad.abs().sum() > 0 and other_branch[0].weight.grad is None


def test_spg_test_cam_is_the_spg_a4_map_with_bias_and_logits_its_gap():
    model = build(SPG, "resnet18", seed=5).eval()
    images, _ = batch()
    classes = torch.tensor([3, 0])
    recorder = Recorder(class_map=model.SPG_A4)
    with torch.no_grad():
        logits, cams = model.predict(images, classes)
        plain_logits = model.logits(images)
    recorder.close()
    features = recorder.inputs["class_map"][0]
    weight, bias = model.SPG_A4.weight[:, :, 0, 0], model.SPG_A4.bias
    expected = torch.einsum("bc,bchw->bhw", weight[classes], features) + bias[classes][:, None, None]
    torch.testing.assert_close(cams, expected)
    torch.testing.assert_close(logits, recorder.outputs["class_map"][0].mean(dim=(2, 3)))
    torch.testing.assert_close(plain_logits, logits)


# ----------------------------------------------------------------------------------------------
# Both: head shapes per family, predict, LR groups, DA-WSOL

# The spec's backbones get the spec's widths (§4.3-4.4); a narrower ResNet keeps ResNet50's ratio of
# head to trunk (wsolbench decision, Backbone.head_width): ACoL C/2, SPG B C/2, SPG_C C/4.
@pytest.mark.parametrize("backbone, acol_in, acol_width, spg_b_in, spg_b_width, spg_c_in, spg_c_width", [
    ("resnet50", 2048, 1024, (1024, 1024), 1024, 2048, 512),
    ("resnet18", 512, 256, (256, 256), 256, 512, 128),
    ("resnet10_half", 256, 128, (128, 128), 128, 256, 64),
    ("vgg16", 512, 1024, (512, 512), 512, 512, 512),
    ("inception_v3", 768, 1024, (288, 768), 512, 1024, 512),
])
def test_head_shapes_per_backbone_family(backbone, acol_in, acol_width, spg_b_in, spg_b_width, spg_c_in,
                                         spg_c_width):
    acol = built_for_reading(ACoL, backbone)
    for branch in (acol.branch_a, acol.branch_b):
        assert branch.hidden[0].weight.shape == (acol_width, acol_in, 3, 3)
        assert branch.hidden[2].weight.shape == (acol_width, acol_width, 3, 3)
        assert branch.classifier.weight.shape == (NUM_CLASSES, acol_width, 1, 1)
    assert acol.feature_channels == acol_width  # what DA-WSOL aligns (spec §5.8)
    spg = built_for_reading(SPG, backbone)
    assert spg.SPG_B_1a[0].weight.shape == (spg_b_width, spg_b_in[0], 3, 3)
    assert spg.SPG_B_2a[0].weight.shape == (spg_b_width, spg_b_in[1], 3, 3)
    assert spg.SPG_B_shared[0].weight.shape == (spg_b_width, spg_b_width, 3, 3)
    assert spg.SPG_B_shared[2].weight.shape == (1, spg_b_width, 1, 1)
    assert spg.SPG_A4.weight.shape == (NUM_CLASSES, spg_c_in, 1, 1)
    assert spg.SPG_C[0].weight.shape == (spg_c_width, spg_c_in, 3, 3)
    assert spg.SPG_C[2].weight.shape == (1, spg_c_width, 1, 1)
    for model in (acol, spg):
        assert not hasattr(model, "head")  # the method's own heads classify


@pytest.mark.parametrize("backbone", ["vgg16", "inception_v3"])
@pytest.mark.parametrize("cls", [ACoL, SPG])
def test_predict_gives_logits_and_feature_resolution_cams(cls, backbone):
    model = built_for_reading(cls, backbone)
    images, labels = batch(size=1)
    with torch.no_grad():
        logits, cams = model.predict(images, labels)
    assert logits.shape == (1, NUM_CLASSES) and cams.shape == (1, 4, 4)
    assert torch.isfinite(logits).all() and torch.isfinite(cams).all()


# Spec §3.1–3.3 with the ACoL/SPG quirks (§8 item 12), profile WE.
LR_CASES = {
    ("acol", "resnet18"): {"branch_a.hidden.0.weight": 1.0, "branch_b.classifier.bias": 1.0,
                           "backbone.layer4.0.conv1.weight": 10.0, "backbone.layer3.0.conv1.weight": 1.0},
    ("acol", "vgg16"): {"branch_a.hidden.0.weight": 10.0, "branch_b.classifier.weight": 10.0,
                        "backbone.features.28.weight": 1.0},
    ("acol", "inception_v3"): {"branch_a.hidden.2.weight": 10.0, "backbone.Mixed_6e.branch1x1.conv.weight": 1.0,
                               "backbone.Conv2d_1a_3x3.conv.weight": 1.0},
    ("spg", "resnet18"): {"SPG_A4.weight": 1.0, "SPG_B_shared.0.weight": 1.0, "SPG_C.2.bias": 1.0,
                          "backbone.layer4.1.conv2.weight": 10.0, "backbone.layer3.0.conv1.weight": 1.0},
    ("spg", "vgg16"): {"SPG_A4.weight": 10.0, "SPG_B_1a.0.weight": 10.0, "backbone.features.0.weight": 1.0,
                       "backbone.features.17.weight": 10.0, "backbone.SPG_A_3.0.weight": 10.0},
    ("spg", "inception_v3"): {"SPG_A4.weight": 10.0, "SPG_B_2a.0.weight": 10.0, "SPG_C.0.weight": 10.0,
                              "backbone.SPG_A3_1b.0.weight": 10.0, "backbone.Mixed_5b.branch1x1.conv.weight": 1.0},
}


@pytest.mark.parametrize("method, backbone", sorted(LR_CASES))
def test_lr_multipliers_follow_the_we_name_rules(method, backbone):
    model = built_for_reading(method_class(method), backbone)
    names = dict(model.named_parameters())
    for name, multiplier in LR_CASES[method, backbone].items():
        assert name in names, name
        assert model.lr_multiplier(name) == multiplier, name
    assert {model.lr_multiplier(name) for name in names} <= {1.0, 10.0}  # every parameter has a rule


@pytest.mark.parametrize("uda", ["mmd", "dann"])
@pytest.mark.parametrize("cls", [ACoL, SPG])
def test_domain_adaptation_wraps_the_method_on_its_section_5_8_feature_map(cls, uda):
    method = build(cls, "resnet18").train()
    wrapped = DomainAdaptation(method, DomainAdaptationOptions(uda=uda, source_samples=4, target_samples=4))
    assert wrapped.assigner.feature_dim == method.feature_channels  # ACoL's F: branch A's hidden (§5.8)
    images, labels = batch(size=2)
    # Step 1 sets the class anchors; step 2 has valid images, so L_d is really computed (spec §5.3).
    for batch_index in range(2):
        progress = TrainingProgress(epoch=1, batch_index=batch_index, iterations_per_epoch=2, num_epochs=3)
        out = wrapped.training_step(images, labels, progress)
        out.loss.backward()
    channels = method.branch_a.hidden_channels if cls is ACoL else method.backbone.out_channels
    assert out.features.shape == (2, channels, 4, 4)
    assert out.source_features.shape == (2, channels)
    assert out.logs["valid_share"] > 0 and out.logs["L_d"] != 0.0 and out.logs["L_u"] > 0.0
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("method, options", [("acol", {"erase_threshold": 0.57}),
                                             ("spg", {"h1": 0.41, "l1": 0.35})])
def test_build_model_picks_the_we_profile_and_names_an_lr_group_for_every_parameter(method, options):
    config = resolve_config(dict(dataset="SyntheticBoxes", data_root="x", out="y", method=method, uda="mmd",
                                 backbone="resnet18", pretrained="none", method_options=options))
    model = build_model(config, num_classes=3)
    assert model.method.profile == "WE"
    for name, value in options.items():
        assert getattr(model.method.options, name) == value
    assert {model.lr_multiplier(name) for name, _ in model.named_parameters()} == {1.0, 10.0}
