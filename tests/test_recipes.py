"""Training recipes (spec §4.7, §6.2, §6.3) and two architecture decisions they depend on.

- `--profile auto` is resolved to the method's first profile before the recipe is looked up, and
  the resolved profile is what the config (and so config.json) records (spec §4.7 decision).
- A per-method learning rate comes only together with the method options of its line (spec §4.7
  decision), for the third-party copies of the WE sheet (profile WE) and for BagCAMs' CUB
  ResNet50 settings (profile DA, spec §9.4).
- InceptionV3's first ADL layer sits before the optional pool after Mixed_5d (spec §4.5).
- Profile DA on VGG16 follows DA24: conv6 at x10 and a zero-initialised classifier (spec §3.2).
"""
from __future__ import annotations

import pytest
import torch

from wsolbench.config import recipe_for, resolve_config
from wsolbench.errors import WsolbenchError
from wsolbench.experiment import build_model
from wsolbench.methods.adl import ADL, ADLLayer
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.base import ClassifierHead, options_from
from wsolbench.methods.cam import CAM
from wsolbench.methods.registry import method_class


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(torch_threads):
    """Small tensors: 1 torch thread (conftest.torch_threads)."""
    yield from torch_threads(1)


def resolved(**values):
    return resolve_config({"data_root": "d", "out": "o", **values})


# --- --profile auto (spec §4.7 decision) -----------------------------------------------------------

@pytest.mark.parametrize("method", ["acol", "spg"])
def test_auto_profile_of_a_we_only_method_gets_the_we_recipe(method):
    config = resolved(dataset="CUB", method=method)  # profile auto
    assert config.profile == "WE" and config.to_dict()["profile"] == "WE"  # what config.json records
    assert config.recipe.startswith("spec §6.3 wsolevaluation CUB resnet50")
    assert config.lr_decay_frequency == 15 and config.epochs == 50  # not §6.2's decay 30
    assert config.lr == {"acol": 1.700073e-5, "spg": 4.521947e-5}[method]  # not §6.2's 1e-3


@pytest.mark.parametrize("method", ["cam", "has", "cutmix", "adl"])
def test_auto_profile_of_the_other_methods_is_da(method):
    config = resolved(dataset="OpenImages", method=method)
    assert config.profile == "DA"
    assert config.recipe.startswith("spec §6.2 DA-WSOL OpenImages resnet50")
    assert config.lr == 1e-3 and config.method_options == {}  # the DA code defaults (spec §4.7)


def test_an_explicit_profile_is_kept_and_build_model_uses_it():
    config = resolved(dataset="SyntheticBoxes", method="cam", profile="WE", pretrained="none")
    assert config.profile == "WE"
    assert build_model(config, num_classes=3).profile == "WE"
    acol = resolved(dataset="SyntheticBoxes", method="acol", pretrained="none")
    assert acol.profile == "WE" and build_model(acol, num_classes=3).profile == "WE"
    acol.profile = "DA"  # build_model still refuses a profile the method does not have
    with pytest.raises(WsolbenchError, match="method 'acol' has no profile 'DA'"):
        build_model(acol, num_classes=3)


def test_an_unknown_method_is_one_line_error_when_resolving_auto():
    with pytest.raises(WsolbenchError, match=r"^unknown method 'camm'; available: acol, adl, cam"):
        resolved(dataset="CUB", method="camm")


def test_recipe_for_needs_a_resolved_profile():
    with pytest.raises(ValueError, match="resolved profile"):
        recipe_for("CUB", "resnet50", "auto", "acol")


# --- per-method learning rates come with their method options (spec §4.7 decision) ------------------

WE_CUB_RESNET50 = {
    "cam": (2.3222617e-4, {}),
    "has": (3.61996526e-3, {"grid_size": 120, "drop_rate": 0.66}),
    "acol": (1.700073e-5, {"erase_threshold": 0.57}),
    "spg": (4.521947e-5, {"h1": 0.41, "l1": 0.35, "h2": 0.24, "l2": 0.21, "h3": 0.12, "l3": 0.08}),
    "adl": (1.253438325e-2, {"gamma": 0.76, "drop_rate": 0.24}),
    "cutmix": (3.333722e-4, {"beta": 1.35, "prob": 0.24}),
}


@pytest.mark.parametrize("method", sorted(WE_CUB_RESNET50))
def test_we_cub_resnet50_learning_rates_come_with_their_method_options(method):
    lr, options = WE_CUB_RESNET50[method]
    config = resolved(dataset="CUB", method=method, profile="WE")
    assert config.lr == lr and config.method_options == options
    assert "third-party" in config.recipe and "unverified" in config.recipe
    assert (config.epochs, config.lr_decay_frequency, config.weight_decay) == (50, 15, 1e-4)  # spec §6.3
    # The option names are the method's own: the harness builds exactly these options.
    built = vars(options_from(method_class(method), "WE", config.method_options))
    assert {name: built[name] for name in options} == options


@pytest.mark.parametrize("backbone, lr", [("resnet50", 3.108411e-5), ("vgg16", 1.654502e-5)])
def test_we_ilsvrc_cam_learning_rates(backbone, lr):
    config = resolved(dataset="ILSVRC", method="cam", profile="WE", backbone=backbone)
    assert config.lr == lr and config.method_options == {}
    assert config.large_feature_map is (backbone != "vgg16")


def test_a_method_without_a_tuned_line_keeps_the_schedule_and_its_code_defaults():
    config = resolved(dataset="ILSVRC", method="has", profile="WE")
    assert config.lr == 1e-3 and config.method_options == {}  # the dataclass lr, nothing paired
    assert config.recipe == "spec §6.3 wsolevaluation ILSVRC resnet50"


# Spec §4.7 BC table and §9.4: CUB ResNet50 baselines in profile DA (BagCAMs run_train.sh), each lr
# with the method options of its line and BagCAMs' schedule (decay every 15).
BC_CUB_RESNET50 = {
    "has": (0.003619965, {"grid_size": 120, "drop_rate": 0.66}),
    "adl": (0.012534383, {"gamma": 0.76, "drop_rate": 0.24}),
    "cutmix": (0.002251717, {"beta": 1.35, "prob": 0.34}),
}


@pytest.mark.parametrize("uda", ["none", "mmd", "dann"])
@pytest.mark.parametrize("method", sorted(BC_CUB_RESNET50))
def test_da_cub_resnet50_baselines_use_the_bagcams_pairs(method, uda):
    lr, options = BC_CUB_RESNET50[method]
    config = resolved(dataset="CUB", method=method, uda=uda)
    assert config.profile == "DA" and config.lr == lr and config.method_options == options
    assert config.lr_decay_frequency == 15 and config.epochs == 50
    assert (config.lambda1, config.lambda2, config.weight_decay, config.large_feature_map) == (0.3, 2.0, 1e-4, True)
    assert "BagCAMs" in config.recipe
    built = vars(options_from(method_class(method), "DA", config.method_options))
    assert {name: built[name] for name in options} == options


def test_da_cub_resnet50_cam_is_bagcams_without_da_wsol_and_the_official_script_with_it():
    plain = resolved(dataset="CUB", method="cam")
    assert (plain.lr, plain.lr_decay_frequency, plain.method_options) == (0.002248447, 15, {})
    assert "BagCAMs" in plain.recipe
    for uda in ("mmd", "dann"):
        ours = resolved(dataset="CUB", method="cam", uda=uda)
        assert (ours.lr, ours.lr_decay_frequency) == (1e-3, 30)  # spec §6.2, the official DA script
        assert ours.recipe == "spec §6.2 DA-WSOL CUB resnet50"


def test_user_method_options_override_the_recipe_one_option_at_a_time(tmp_path):
    flag_only = resolved(dataset="CUB", method="has", profile="WE", method_options={"drop_rate": 0.5})
    assert flag_only.method_options == {"grid_size": 120, "drop_rate": 0.5}
    assert flag_only.lr == 3.61996526e-3
    spg_file = tmp_path / "spg.toml"
    spg_file.write_text("[method_options]\nh1 = 0.9\n")
    spg = resolve_config({"data_root": "d", "out": "o", "dataset": "CUB", "method": "spg",
                          "method_options": {"l3": 0.1}}, spg_file)
    assert spg.method_options == {"h1": 0.9, "l1": 0.35, "h2": 0.24, "l2": 0.21, "h3": 0.12, "l3": 0.1}
    has_file = tmp_path / "has.toml"
    has_file.write_text("lr = 0.01\n[method_options]\ngrid_size = 60\n")
    has = resolve_config({"data_root": "d", "out": "o", "dataset": "CUB", "method": "has", "profile": "WE",
                          "method_options": {"drop_rate": 0.4}}, has_file)
    assert has.method_options == {"grid_size": 60, "drop_rate": 0.4} and has.lr == 0.01


# --- InceptionV3 ADL position (spec §4.5) ------------------------------------------------------------

@pytest.mark.parametrize("large_feature_map, pooled_side", [(False, 4), (True, 8)])
def test_inception_first_adl_layer_sees_mixed_5d_before_the_pool(large_feature_map, pooled_side):
    with torch.device("meta"):  # shapes only
        method = ADL(build_backbone("inception_v3", variant="adl", large_feature_map=large_feature_map),
                     3, "WE", options_from(ADL, "WE", {}))
    backbone = method.backbone
    first = backbone.inserted["Mixed_5d"]
    assert isinstance(first, ADLLayer)
    seen = {}
    backbone.Mixed_5d.register_forward_hook(lambda m, args, out: seen.__setitem__("Mixed_5d", out.shape))
    first.register_forward_pre_hook(lambda m, args: seen.__setitem__("ADL_5d", args[0].shape))
    backbone.Mixed_6a.register_forward_pre_hook(lambda m, args: seen.__setitem__("Mixed_6a", args[0].shape))
    method.train()
    with torch.device("meta"):
        method.features(torch.empty(2, 3, 64, 64))
    assert seen["Mixed_5d"] == seen["ADL_5d"] == (2, 288, 8, 8)  # at 64 px, before the 3x3/s2 pool
    assert seen["Mixed_6a"] == (2, 288, pooled_side, pooled_side)


# --- VGG16 in profile DA follows DA24 (spec §3.2 decision) ---------------------------------------------

def test_vgg16_profile_da_trains_conv6_at_ten_times_and_features_at_one():
    with torch.device("meta"):
        cam = build_backbone("vgg16", variant="cam")
        adl = build_backbone("vgg16", variant="adl", large_feature_map=False)
    for backbone in (cam, adl):
        for profile in ("DA", "WE"):
            groups = {name: backbone.lr_multiplier(name, profile) for name, _ in backbone.named_parameters()}
            assert {name for name, m in groups.items() if m == 10.0} == {"conv6.weight", "conv6.bias"}
            assert all(m == 1.0 for name, m in groups.items() if name.startswith("features."))


def test_vgg16_profile_da_classifier_starts_at_zero_and_we_and_resnet_do_not():
    torch.manual_seed(0)
    da = ClassifierHead(1024, 5, "DA", "vgg")
    assert torch.count_nonzero(da.fc.weight) == 0 and torch.count_nonzero(da.fc.bias) == 0
    we = ClassifierHead(1024, 5, "WE", "vgg")  # WE: Linear, N(0, 0.01)
    assert isinstance(we.fc, torch.nn.Linear) and 0.005 < float(we.fc.weight.detach().std()) < 0.015
    resnet = ClassifierHead(2048, 5, "DA", "resnet")  # spec §3.1: xavier-uniform
    bound = (6.0 / (2048 + 5)) ** 0.5
    assert torch.count_nonzero(resnet.fc.weight) > 0 and float(resnet.fc.weight.detach().abs().max()) <= bound


def test_a_profile_da_vgg16_model_has_the_da24_head_and_groups():
    config = resolved(dataset="SyntheticBoxes", method="cam", uda="mmd", backbone="vgg16", pretrained="none",
                      profile="DA")
    with torch.device("meta"):
        model = build_model(config, num_classes=3)
    assert model.lr_multiplier("method.backbone.conv6.weight") == 10.0
    assert model.lr_multiplier("method.backbone.features.0.weight") == 1.0
    assert model.lr_multiplier("method.head.fc.weight") == 10.0
    real = CAM(build_backbone("vgg16", variant="cam", large_feature_map=False), 3, "DA")
    assert torch.count_nonzero(real.head.fc.weight) == 0 and torch.count_nonzero(real.head.fc.bias) == 0
