"""HaS (spec §4.2), CutMix (§4.6) and ADL (§4.5): known answers for each mechanism, their option
defaults per profile (§4.7), and a training step under DA-WSOL (§5.8)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsolbench.config import resolve_config
from wsolbench.errors import WsolbenchError
from wsolbench.experiment import build_model
from wsolbench.methods.adl import ADL, ADLLayer, drop_mask, importance_map
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.base import TrainingProgress, WSOLMethod, options_from
from wsolbench.methods.cutmix import CutBox, CutMix, cutmix_batch
from wsolbench.methods.dawsol.wrapper import DomainAdaptation, DomainAdaptationOptions
from wsolbench.methods.has import HaS, hide_patches
from wsolbench.methods.registry import method_class

NUM_CLASSES = 3
DA_ACTIVE = TrainingProgress(epoch=1, batch_index=0, iterations_per_epoch=2, num_epochs=2)


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(torch_threads):
    """Small tensors: 1 torch thread(s) (conftest.torch_threads)."""
    yield from torch_threads(1)


def tiny_method(cls: type[WSOLMethod], profile: str = "DA", backbone: str = "resnet18",
                **option_values) -> WSOLMethod:
    """A method on a randomly initialized backbone, built as the harness builds it."""
    torch.manual_seed(0)
    options = options_from(cls, profile, option_values)
    trunk = build_backbone(backbone, variant=cls.backbone_variant, large_feature_map=True, pretrained="none")
    return cls(trunk, NUM_CLASSES, profile, options)


def distinct_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Images with no zero pixel, so a hidden (zeroed) pixel is unmistakable."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 1.0


# --- HaS (spec §4.2) -----------------------------------------------------------------------------

def test_has_hides_the_cells_python_random_draws_with_partial_border_cells():
    # g = 111 on 224 px: cells start at 0, 111, 222 (the last 2 px wide), 3×3 cells per image.
    # random.seed(3) draws 0.238 0.544 0.370 | 0.604 0.626 0.066 | 0.013 0.838 0.259 (image 0),
    # 0.234 0.996 0.470 | 0.837 0.476 0.639 | 0.151 0.635 0.868 (image 1): u <= 0.19 hides.
    images = distinct_images(2, 3, 224, 224)
    before = images.clone()
    random.seed(3)
    hidden = hide_patches(images, grid_size=111, drop_rate=0.19)
    after_has = random.random()
    expected = images.clone()
    expected[0, :, 111:222, 222:224] = 0  # image 0, cell (1, 2): a partial column cell
    expected[0, :, 222:224, 0:111] = 0  # image 0, cell (2, 0): a partial row cell
    expected[1, :, 222:224, 0:111] = 0  # image 1, cell (2, 0)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    assert torch.equal(images, before)  # the caller's batch is not touched
    reference_stream = random.Random(3)
    assert after_has == [reference_stream.random() for _ in range(19)][-1]  # exactly 18 draws


def test_has_draws_row_starts_outside_and_hides_at_u_equal_to_p(monkeypatch):
    # A 4×6 image with g = 2: 2 row starts × 3 column starts, drawn row by row.
    draws = iter([0.5, math.nextafter(0.5, 1.0), 0.9, 0.0, 0.7, 0.8])
    monkeypatch.setattr(random, "random", lambda: next(draws))
    hidden = hide_patches(distinct_images(1, 2, 4, 6), grid_size=2, drop_rate=0.5)
    expected_zero = torch.zeros(4, 6, dtype=torch.bool)
    expected_zero[0:2, 0:2] = True  # draw 0: u == p hides cell (row 0, col 0)
    expected_zero[2:4, 0:2] = True  # draw 3: cell (row 1, col 0); draw 1 (just above p) hides nothing
    assert torch.equal(hidden[0] == 0, expected_zero.expand(2, 4, 6))


def test_has_grid_zero_is_identity_and_draws_nothing():
    images = distinct_images(2, 3, 16, 16)
    random.seed(5)
    assert torch.equal(hide_patches(images, grid_size=0, drop_rate=1.0), images)
    assert random.random() == random.Random(5).random()


def test_has_training_step_forwards_the_hidden_batch_and_test_time_hides_nothing():
    method = tiny_method(HaS, grid_size=8, drop_rate=0.5).eval()  # eval: BN is deterministic
    images = distinct_images(2, 3, 32, 32)
    labels = torch.tensor([0, 2])
    before = images.clone()
    with torch.no_grad():
        random.seed(11)
        out = method.training_step(images, labels, TrainingProgress())
        random.seed(11)
        from wsolbench.methods.has import scaled_grid_size
        hidden = hide_patches(images, scaled_grid_size(8, 32), 0.5)  # g = 8 at 224 px is 1 at 32 px
        assert (hidden == 0).any() and not torch.equal(hidden, images)
        torch.testing.assert_close(out.logits, method.logits(hidden))
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
        assert torch.equal(images, before)
        # Test time: CAM on the untouched images, no draw from Python's random.
        state = random.getstate()
        logits, cams = method.predict(images, labels)
        assert random.getstate() == state
        features = method.backbone(images)[0]
        torch.testing.assert_close(logits, method.head(features.mean(dim=(2, 3))))
        torch.testing.assert_close(cams, method.head.class_maps(features, labels), equal_nan=True)
    assert [(t.weight, t.labels.tolist()) for t in out.domain_targets] == [(1.0, [0, 2])]


# --- CutMix (spec §4.6) --------------------------------------------------------------------------

def test_cutmix_box_permutation_and_kept_area_for_a_seed():
    # np.random.seed(5): u < 0.5 mixes, λ ~ Beta(1, 1) gives cut = 134 or 135 (cut//2 = 67), the
    # centre is (143, 113); torch.manual_seed(5): π = randperm(4) = [3, 1, 0, 2].
    images = distinct_images(4, 3, 224, 224)
    before = images.clone()
    np.random.seed(5)
    torch.manual_seed(5)
    mix = cutmix_batch(images, beta=1.0, prob=0.5)
    assert mix is not None
    assert mix.box == CutBox(r1=76, r2=210, c1=46, c2=180)
    assert mix.permutation.tolist() == [3, 1, 0, 2]
    assert mix.kept_fraction == 1.0 - 134 * 134 / (224 * 224)
    expected = images.clone()
    for b, source in enumerate([3, 1, 0, 2]):
        expected[b, :, 76:210, 46:180] = images[source, :, 76:210, 46:180]
    torch.testing.assert_close(mix.images, expected, rtol=0, atol=0)
    assert torch.equal(images, before)


def test_cutmix_box_clips_at_the_border_and_uses_the_batch_size_not_224():
    # A 40×64 batch: draws in the spec's order (u, λ, row centre, column centre) on numpy.
    for seed in range(20):
        np.random.seed(seed)
        u, lam = np.random.rand(), np.random.beta(2.0, 2.0)
        centre_row, centre_col = np.random.randint(40), np.random.randint(64)
        half_rows, half_cols = int(40 * np.sqrt(1 - lam)) // 2, int(64 * np.sqrt(1 - lam)) // 2
        expected = CutBox(max(centre_row - half_rows, 0), min(centre_row + half_rows, 40),
                          max(centre_col - half_cols, 0), min(centre_col + half_cols, 64))
        np.random.seed(seed)
        mix = cutmix_batch(distinct_images(2, 1, 40, 64), beta=2.0, prob=0.6)
        assert (mix is None) == (u >= 0.6)
        if mix is not None:
            assert mix.box == expected
            assert mix.kept_fraction == 1.0 - expected.area / (40 * 64)
    np.random.seed(2)  # a centre near the bottom-left border: the box is clipped there
    torch.manual_seed(0)
    assert cutmix_batch(distinct_images(4, 3, 224, 224), beta=1.0, prob=0.5).box == CutBox(101, 224, 0, 184)


def test_cutmix_loss_mixes_the_two_cross_entropies_and_gives_two_domain_targets():
    method = tiny_method(CutMix, beta=1.0, prob=1.0).eval()  # eval: BN is deterministic
    images = distinct_images(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        np.random.seed(7)
        torch.manual_seed(7)
        out = method.training_step(images, labels, TrainingProgress())
        np.random.seed(7)
        torch.manual_seed(7)
        mix = cutmix_batch(images, 1.0, 1.0)
        torch.testing.assert_close(out.logits, method.logits(mix.images))
    pasted = labels[mix.permutation]
    kept = mix.kept_fraction
    assert 0.0 < kept < 1.0 and not torch.equal(pasted, labels)
    torch.testing.assert_close(out.loss, kept * F.cross_entropy(out.logits, labels)
                               + (1 - kept) * F.cross_entropy(out.logits, pasted))
    assert [(t.labels.tolist(), t.weight) for t in out.domain_targets] == [
        (labels.tolist(), kept), (pasted.tolist(), 1.0 - kept)]


@pytest.mark.parametrize("beta, prob, numpy_draws", [(1.0, 0.0, 1), (0.0, 1.0, 0)])
def test_cutmix_off_leaves_the_batch_alone_with_one_target(beta, prob, numpy_draws):
    method = tiny_method(CutMix, beta=beta, prob=prob).eval()
    images = distinct_images(2, 3, 32, 32)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        np.random.seed(0)
        out = method.training_step(images, labels, TrainingProgress())
        torch.testing.assert_close(out.logits, method.logits(images))
    # prob 0: u is drawn and fails; beta 0: nothing is drawn (beta is tested first).
    reference = np.random.RandomState(0)
    assert np.random.rand() == reference.rand(numpy_draws + 1)[-1]
    assert [(t.labels.tolist(), t.weight) for t in out.domain_targets] == [([1, 2], 1.0)]
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


# --- ADL (spec §4.5) -----------------------------------------------------------------------------

def adl_input() -> torch.Tensor:
    """Two images of 2 channels whose channel means are a0 = [[1, 2], [3, 4]], a1 = -a0."""
    a0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    channels = torch.stack([torch.stack([2 * a0, torch.zeros(2, 2)]), torch.stack([torch.zeros(2, 2), -2 * a0])])
    return channels  # (2, 2, 2, 2)


def test_adl_importance_map_and_drop_mask_known_answers():
    attention = adl_input().mean(dim=1, keepdim=True)
    torch.testing.assert_close(importance_map(attention), torch.sigmoid(attention))
    mask = drop_mask(attention, gamma=0.75)
    # Image 0: max 4, threshold 3: the pixels at >= 3 are dropped.
    assert mask[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    # Image 1: max -1, threshold -0.75 lies above every pixel: nothing is dropped (no min-max).
    assert mask[1, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("seed, u, drop_rate, uses_mask", [
    (0, 0.4962566, 0.5, False),  # floor(0.996) = 0: importance map
    (1, 0.7576316, 0.5, True),  # floor(1.258) = 1: drop mask
    (3, 0.0042635, 1.0, True),  # drop_rate 1: always the mask
    (1, 0.7576316, 0.0, False),  # drop_rate 0: never
])
def test_adl_selects_one_map_for_the_whole_batch_from_one_torch_draw(seed, u, drop_rate, uses_mask):
    x = adl_input()
    layer = ADLLayer(drop_rate=drop_rate, gamma=0.75).train()
    torch.manual_seed(seed)
    out = layer(x)
    next_draw = torch.rand(())
    torch.manual_seed(seed)
    draws = torch.rand(2)
    assert draws[0].item() == pytest.approx(u, abs=1e-6)
    assert next_draw == draws[1]  # one draw per forward pass
    attention = x.mean(dim=1, keepdim=True)
    selected = drop_mask(attention, 0.75) if uses_mask else torch.sigmoid(attention)
    torch.testing.assert_close(out, x * selected, rtol=0, atol=0)


def test_adl_is_identity_in_eval_and_draws_nothing():
    x = adl_input()
    torch.manual_seed(0)
    assert ADLLayer(drop_rate=1.0, gamma=0.75).eval()(x) is x
    assert torch.rand(()).item() == pytest.approx(0.4962566, abs=1e-6)


@pytest.mark.parametrize("name, expected", [
    ("resnet18", {"layer3_block0": (256, 8), "layer4_block0": (512, 8), "layer4_end": (512, 8)}),
    ("resnet50", {"layer3_block0": (1024, 8), "layer4_block0": (2048, 8), "layer4_end": (2048, 8)}),
    ("vgg16", {"pool3": (256, 8), "conv4_3": (512, 8), "conv5_3": (512, 8)}),
    ("inception_v3", {"Mixed_5d": (288, 8), "Mixed_6e": (768, 8), "SPG_A3_2b": (1024, 8)}),
])
@pytest.mark.parametrize("profile", ["DA", "WE"])
def test_adl_layers_sit_at_the_insert_points_of_each_family(name, expected, profile):
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        method = ADL(build_backbone(name, variant="adl", pretrained="none"), NUM_CLASSES, profile,
                     options_from(ADL, profile, {}))
    layers = dict(method.backbone.inserted.items())
    assert list(layers) == list(expected)
    defaults = (0.59, 0.99) if profile == "DA" else (0.75, 0.9)
    assert all(isinstance(layer, ADLLayer) and (layer.drop_rate, layer.gamma) == defaults
               for layer in layers.values())
    assert all(not list(layer.parameters()) and not list(layer.buffers()) for layer in layers.values())
    seen: dict[str, tuple[int, ...]] = {}
    for point, layer in layers.items():
        layer.register_forward_pre_hook(lambda module, args, point=point: seen.__setitem__(point, args[0].shape))
    method.train()
    torch.manual_seed(0)
    with torch.device("meta"):
        method.features(torch.empty(2, 3, 64, 64))
    assert seen == {point: (2, channels, side, side) for point, (channels, side) in expected.items()}
    # One draw from torch's CPU generator per ADL layer per forward pass (spec §4.5).
    assert torch.rand(()) == torch.rand(4, generator=torch.Generator().manual_seed(0))[3]


def test_adl_trains_a_step_and_needs_the_adl_variant():
    method = tiny_method(ADL, drop_rate=0.5, gamma=0.9).train()
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    out = method.training_step(distinct_images(2, 3, 32, 32), torch.tensor([0, 1]), TrainingProgress())
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss)
    assert not torch.equal(before["head.fc.weight"], method.head.fc.weight)
    assert not torch.equal(before["backbone.layer3.0.conv1.weight"], method.backbone.layer3[0].conv1.weight)
    with pytest.raises(WsolbenchError, match="'adl' variant"):
        ADL(build_backbone("resnet18", variant="cam"), NUM_CLASSES)


# --- options and profiles (spec §4.7) ------------------------------------------------------------

@pytest.mark.parametrize("cls, da_defaults, we_defaults", [
    (HaS, {"grid_size": 111, "drop_rate": 0.19}, {"grid_size": 4, "drop_rate": 0.5}),
    (CutMix, {"beta": 1.35, "prob": 0.34}, {"beta": 1.0, "prob": 1.0}),
    (ADL, {"drop_rate": 0.59, "gamma": 0.99}, {"drop_rate": 0.75, "gamma": 0.9}),
])
def test_option_defaults_are_the_code_defaults_of_each_profile(cls, da_defaults, we_defaults):
    assert method_class(cls.name) is cls
    assert vars(cls.Options()) == da_defaults == vars(options_from(cls, "DA", {}))
    assert vars(options_from(cls, "WE", {})) == we_defaults
    first = next(iter(da_defaults))
    assert getattr(options_from(cls, "WE", {first: da_defaults[first]}), first) == da_defaults[first]  # explicit wins
    assert cls.backbones == ("resnet50", "vgg16", "inception_v3", "resnet18", "resnet10_half") and cls.profiles == ("DA", "WE")


@pytest.mark.parametrize("cls, values", [
    (HaS, {"grid_size": -1}), (HaS, {"grid_size": 2.5}), (HaS, {"grid_size": "4"}), (HaS, {"drop_rate": 1.5}),
    (CutMix, {"beta": "1"}), (ADL, {"drop_rate": -0.1}),
])
def test_bad_option_values_are_rejected_by_name(cls, values):
    with pytest.raises(WsolbenchError, match=f"{cls.name} option {next(iter(values))}"):
        options_from(cls, "DA", values)


@pytest.mark.parametrize("name, profile, options, expected", [
    ("has", "WE", {"drop_rate": 0.3}, {"grid_size": 4, "drop_rate": 0.3}),
    ("cutmix", "DA", {}, {"beta": 1.35, "prob": 0.34}),
    ("adl", "WE", {"gamma": 0.8}, {"drop_rate": 0.75, "gamma": 0.8}),
])
def test_the_harness_builds_each_method_from_a_config(name, profile, options, expected):
    config = resolve_config(dict(dataset="SyntheticBoxes", data_root="x", out="y", method=name, uda="mmd",
                                 backbone="resnet18", pretrained="none", profile=profile, method_options=options))
    model = build_model(config, num_classes=NUM_CLASSES)
    assert isinstance(model, DomainAdaptation) and model.method.name == name and model.method.profile == profile
    assert vars(model.method.options) == expected
    layers = [type(module).__name__ for module in model.method.backbone.inserted.values()]
    assert layers == (["ADLLayer"] * 3 if name == "adl" else [])


# --- with DA-WSOL (spec §5.8) ----------------------------------------------------------------------

@pytest.mark.parametrize("uda", ["mmd", "dann"])
@pytest.mark.parametrize("cls, option_values, targets", [
    (HaS, {"grid_size": 16, "drop_rate": 0.5}, 1),
    (CutMix, {"beta": 1.0, "prob": 1.0}, 2),  # prob 1 > u always: the mixed path, two TSA runs
    (ADL, {"drop_rate": 0.5, "gamma": 0.9}, 1),
])
def test_a_da_wsol_training_step_and_prediction(cls, option_values, targets, uda):
    method = tiny_method(cls, **option_values)
    model = DomainAdaptation(method, DomainAdaptationOptions(uda=uda, source_samples=4, target_samples=4)).train()
    images = distinct_images(4, 3, 64, 64) - 1.5
    labels = torch.tensor([0, 1, 2, 0])
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    out = model.training_step(images, labels, DA_ACTIVE)
    out.loss.backward()
    assert len(out.domain_targets) == targets
    assert torch.isfinite(out.loss) and math.isfinite(out.logs["L_d"]) and math.isfinite(out.logs["L_u"])
    assert out.logs["valid_share"] > 0  # the assigner found samples, so L_d really entered the loss
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        logits, cams = model.predict(images, labels)
    assert logits.shape == (4, NUM_CLASSES) and cams.shape == (4, 8, 8)


def test_has_grid_is_given_for_224_px_crops_and_scales_with_the_crop():
    from wsolbench.methods.has import scaled_grid_size
    assert scaled_grid_size(111, 224) == 111  # the protocol's size: exactly the spec's g
    assert scaled_grid_size(111, 64) == 32  # 111 * 64 / 224 = 31.7
    assert scaled_grid_size(4, 64) == 1 and scaled_grid_size(0, 64) == 0


@pytest.mark.parametrize("uda", ["mmd", "dann"])
def test_da_wsol_logs_its_terms_the_cluster_sizes_and_the_background_anchor(uda):
    """history.json gets what DA-WSOL did per batch (L_c, the weighted terms, the valid share, the TSA's
    cluster sizes, |M0|), and the logged terms add up to the loss that was optimised."""
    method = tiny_method(HaS, grid_size=4, drop_rate=0.0)
    model = DomainAdaptation(method, DomainAdaptationOptions(uda=uda, lambda1=0.7, lambda2=1.9,
                                                             source_samples=4, target_samples=4)).train()
    images = distinct_images(4, 3, 64, 64) - 1.5
    labels = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    out = model.training_step(images, labels, DA_ACTIVE)
    logs = out.logs
    assert logs["lambda1_L_d"] == pytest.approx(0.7 * logs["L_d"]) and logs["lambda2_L_u"] == pytest.approx(1.9 * logs["L_u"])
    assert float(out.loss.detach()) == pytest.approx(logs["L_c"] + logs["lambda1_L_d"] + logs["lambda2_L_u"], rel=1e-5)
    pixels = out.features.shape[2] * out.features.shape[3]  # every pixel is in exactly one cluster
    assert logs["universum_pixels"] + logs["fake_target_pixels"] + logs["real_target_pixels"] == pytest.approx(pixels)
    assert 0.0 <= logs["valid_share"] <= 1.0
    assert logs["background_anchor_norm"] == pytest.approx(float(model.assigner.universum_anchor.norm()))
    assert logs["background_anchor_norm"] > 0.0  # M0 moved off its zero initialisation
    warm_up = model.training_step(images, labels, TrainingProgress(epoch=0))  # start_epoch 0: inactive
    assert set(warm_up.logs) == {"L_c"}
