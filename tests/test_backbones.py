"""The WSOL backbones (spec §3, §4.3–4.5): shapes, taps, insert points, pretrained loading, LR groups.

Shapes at 224 px are checked on the meta device (no arithmetic); one real 224 px forward per
family checks that the numbers flow. Real forwards otherwise use 64 px inputs and resnet18.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import urllib.request

import pytest
import torch
import torchvision
from torch import nn

from wsolbench.errors import WsolbenchError
from wsolbench.methods.backbones import (
    Backbone,
    available_backbones,
    build_backbone,
    load_pretrained,
    resnet,
)

VARIANTS = ("cam", "acol", "spg", "adl")

# (name, variant) -> (C, {tap: channels}); spatial size at 224 px is 28 (large) or 14.
EXPECTED_CHANNELS = {
    ("resnet50", "cam"): (2048, {}), ("resnet50", "acol"): (2048, {}),
    ("resnet50", "spg"): (2048, {"SPG_A1": 1024, "SPG_A2": 1024}), ("resnet50", "adl"): (2048, {}),
    ("resnet18", "cam"): (512, {}), ("resnet18", "acol"): (512, {}),
    ("resnet18", "spg"): (512, {"SPG_A1": 256, "SPG_A2": 256}), ("resnet18", "adl"): (512, {}),
    ("vgg16", "cam"): (1024, {}), ("vgg16", "acol"): (512, {}),
    ("vgg16", "spg"): (512, {"SPG_A1": 512, "SPG_A2": 512}), ("vgg16", "adl"): (1024, {}),
    ("inception_v3", "cam"): (1024, {}), ("inception_v3", "acol"): (768, {}),
    ("inception_v3", "spg"): (1024, {"SPG_A1": 288, "SPG_A2": 768}), ("inception_v3", "adl"): (1024, {}),
}

EXPECTED_INSERT_POINTS = {
    "resnet50": ("layer3_block0", "layer4_block0", "layer4_end"),
    "resnet18": ("layer3_block0", "layer4_block0", "layer4_end"),
    "vgg16": ("pool3", "conv4_3", "conv5_3"),
    "inception_v3": ("Mixed_5d", "Mixed_6e", "SPG_A3_2b"),
}


def build_on_meta(name: str, **options) -> Backbone:
    """Build without allocating or computing: enough for shapes, names and LR groups."""
    with torch.device("meta"):
        return build_backbone(name, **options)


def randomize_batch_norm_statistics(model: nn.Module, seed: int = 0) -> None:
    """Make running stats distinct from their init, so a round trip proves they were loaded."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A torchvision resnet18 state dict with random weights, saved as a .pth file."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    randomize_batch_norm_statistics(model)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(state, path)
    return str(path), state


# --- registry --------------------------------------------------------------------------------

def test_registry_lists_every_family():
    assert available_backbones() == ("inception_v3", "resnet10_half", "resnet18", "resnet50", "vgg16")


def test_unknown_backbone_or_variant_is_a_one_line_error():
    with pytest.raises(WsolbenchError, match="unknown backbone 'resnet101'.*resnet50"):
        build_backbone("resnet101")
    with pytest.raises(WsolbenchError, match="unknown backbone variant 'bagcam'"):
        build_backbone("resnet18", variant="bagcam")


# --- shapes, taps ----------------------------------------------------------------------------

@pytest.mark.parametrize("large_feature_map", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["resnet50", "resnet18", "vgg16", "inception_v3"])
def test_feature_and_tap_shapes_at_224(name, variant, large_feature_map):
    backbone = build_on_meta(name, variant=variant, large_feature_map=large_feature_map).eval()
    channels, tap_channels = EXPECTED_CHANNELS[name, variant]
    side = 28 if large_feature_map else 14
    with torch.device("meta"):
        features, taps = backbone(torch.empty(2, 3, 224, 224), taps=backbone.tap_names)
    assert backbone.out_channels == channels
    assert tuple(features.shape) == (2, channels, side, side)
    assert backbone.tap_channels == tap_channels
    assert set(taps) == set(tap_channels)
    for tap, tap_channel_count in tap_channels.items():
        assert tuple(taps[tap].shape) == (2, tap_channel_count, side, side)
    expected_points = EXPECTED_INSERT_POINTS[name] if variant == "adl" else ()
    assert backbone.insert_points == expected_points
    assert (backbone.family, backbone.variant, backbone.name) == (
        {"resnet50": "resnet", "resnet18": "resnet", "vgg16": "vgg", "inception_v3": "inception"}[name],
        variant, name)


@pytest.mark.parametrize(
    "name, variant, large_feature_map, side",
    [("resnet50", "cam", False, 14), ("vgg16", "cam", False, 14), ("inception_v3", "cam", False, 14)],
)
def test_one_real_forward_at_224_per_family(name, variant, large_feature_map, side):
    torch.manual_seed(0)
    backbone = build_backbone(name, variant=variant, large_feature_map=large_feature_map).eval()
    with torch.no_grad():
        features, taps = backbone(torch.randn(1, 3, 224, 224))
    assert tuple(features.shape) == (1, backbone.out_channels, side, side)
    assert taps == {}
    # Spec §5.1: every F ends in a ReLU (or dropout of one), so it is non-negative.
    assert torch.isfinite(features).all() and (features >= 0).all()


@pytest.mark.parametrize("side, large_side, small_side", [(64, 8, 4), (96, 12, 6)])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["resnet50", "resnet18", "vgg16", "inception_v3"])
def test_small_inputs_work_for_cpu_runs(name, variant, side, large_side, small_side):
    """64–96 px images of the generated dataset keep the output strides (real runs: inserts test)."""
    for large_feature_map, expected_side in [(True, large_side), (False, small_side)]:
        backbone = build_on_meta(name, variant=variant, large_feature_map=large_feature_map)
        with torch.device("meta"):
            features, taps = backbone(torch.empty(2, 3, side, side), taps=backbone.tap_names)
        assert tuple(features.shape) == (2, backbone.out_channels, expected_side, expected_side)
        assert all(tuple(tap.shape[2:]) == (expected_side,) * 2 for tap in taps.values())


def test_unknown_tap_is_rejected():
    backbone = build_on_meta("resnet18", variant="cam")
    with pytest.raises(KeyError, match="SPG_A1"):
        backbone(torch.empty(1, 3, 64, 64, device="meta"), taps=("SPG_A1",))


@pytest.mark.parametrize("variant, dropout_inputs", [
    ("cam", [768, 1024, 1024]), ("spg", [768, 1024, 1024]), ("adl", []), ("acol", []),
])
def test_inception_dropout_sits_after_mixed_6e_and_each_spg_a3_conv(variant, dropout_inputs):
    """Spec §3.3: dropout(0.5) after Mixed_6e and after each SPG_A3 conv; none for ADL (§4.5)
    or ACoL (§4.3)."""
    backbone = build_on_meta("inception_v3", variant=variant).train()
    seen: list[int] = []
    for module in backbone.modules():
        if isinstance(module, nn.Dropout):
            assert module.p == 0.5
            module.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    with torch.device("meta"):
        backbone(torch.empty(1, 3, 64, 64))
    assert seen == dropout_inputs


def test_inception_cam_features_are_stochastic_in_training_only():
    torch.manual_seed(0)
    backbone = build_backbone("inception_v3", variant="cam")
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(backbone.train()(images)[0], backbone(images)[0])
        assert torch.equal(backbone.eval()(images)[0], backbone(images)[0])


# --- the trunks are torchvision's ------------------------------------------------------------

def test_resnet_trunk_computes_torchvision_layer3(resnet18_file):
    """With the same weights, SPG_A2 (end of layer3) equals torchvision's layer3 output."""
    path, _ = resnet18_file
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(path, weights_only=True))
    backbone = build_backbone("resnet18", variant="spg", large_feature_map=False, pretrained=path)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference.eval(), backbone.eval()
        expected = reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(images)))))))
        _, taps = backbone(images, taps=("SPG_A2",))
    torch.testing.assert_close(taps["SPG_A2"], expected, rtol=0, atol=0)


def test_vgg_features_keep_torchvision_numbering(tmp_path):
    torch.manual_seed(0)
    reference_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{key}": value for key, value in reference_features.state_dict().items()}
    path = tmp_path / "vgg16-features.pth"
    torch.save(state, path)
    backbone = build_backbone("vgg16", variant="cam", large_feature_map=False, pretrained=path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # up to conv5_3 + ReLU: pool4 kept, pool5 removed (spec §3.2)
        torch.testing.assert_close(backbone.features(images), reference_features[:30](images),
                                   rtol=0, atol=0)


# --- pretrained loading ----------------------------------------------------------------------

def test_pretrained_none_records_nothing():
    assert build_on_meta("resnet18").pretrained_info is None


def test_resnet_state_dict_round_trips_every_trunk_tensor(resnet18_file, caplog):
    path, state = resnet18_file
    caplog.set_level(logging.INFO, logger="wsolbench.methods.backbones")
    backbone = build_backbone("resnet18", variant="adl", pretrained=path,
                              insert={"layer4_end": nn.Conv2d(512, 512, 1)})
    loaded = backbone.state_dict()
    trunk_keys = backbone.pretrained_trunk_keys()
    assert len(trunk_keys) == len(state) - 2
    for key in trunk_keys:
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0, msg=key)
    info = backbone.pretrained_info
    assert info.dropped_keys == ("fc.bias", "fc.weight")
    assert info.source == "file" and info.path == path
    with open(path, "rb") as stream:
        assert info.sha256 == hashlib.sha256(stream.read()).hexdigest()
    # Spec §3.1/§8 item 20: the 1000-class fc stays available for profile WE on ILSVRC.
    torch.testing.assert_close(info.fc_state["weight"], state["fc.weight"], rtol=0, atol=0)
    torch.testing.assert_close(info.fc_state["bias"], state["fc.bias"], rtol=0, atol=0)
    assert info.to_record()["dropped_keys"] == ["fc.bias", "fc.weight"]
    assert "dropped 2 tensors not in it (fc.*)" in caplog.text


def test_inception_file_loads_and_drops_mixed7_auxlogits_fc(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.inception_v3(init_weights=False, aux_logits=True)
    randomize_batch_norm_statistics(reference)
    # The original 2017 "google" file predates num_batches_tracked: leave them out.
    state = {key: value for key, value in reference.state_dict().items()
             if not key.endswith("num_batches_tracked")}
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    backbone = build_backbone("inception_v3", variant="cam", pretrained=path)
    loaded = backbone.state_dict()
    for key in backbone.pretrained_trunk_keys():
        if key.endswith("num_batches_tracked"):
            assert loaded[key] == 0
        else:
            torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0, msg=key)
    dropped_groups = {key.split(".")[0] for key in backbone.pretrained_info.dropped_keys}
    assert dropped_groups == {"AuxLogits", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"}
    assert backbone.pretrained_info.fc_state == {}  # Inception's fc fits no WSOL head
    # The new layers keep their xavier init with bias 0 (spec §3.3).
    assert torch.count_nonzero(loaded["SPG_A3_2b.0.bias"]) == 0


def test_vgg_file_drops_classifier_and_keeps_conv6_init(tmp_path):
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(10, 4)  # fc6–fc8 are dropped (spec §3.2)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    fresh = build_backbone("vgg16", variant="cam")
    torch.manual_seed(1)
    backbone = build_backbone("vgg16", variant="cam", pretrained=path)
    assert backbone.pretrained_info.dropped_keys == ("classifier.6.weight",)
    torch.testing.assert_close(backbone.features[28].weight, state["features.28.weight"], rtol=0, atol=0)
    torch.testing.assert_close(backbone.conv6.weight, fresh.conv6.weight, rtol=0, atol=0)


def test_corrupted_file_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WsolbenchError) as error:
        build_backbone("resnet18", pretrained=str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(WsolbenchError, match="absent.pth.*not found"):
        build_backbone("resnet18", pretrained=path)


def test_state_dict_of_another_architecture_is_rejected(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(WsolbenchError) as error:
        build_on_meta("resnet50", pretrained=path)
    message = str(error.value)
    assert path in message and "resnet50 trunk" in message and "\n" not in message


def test_tensor_of_wrong_shape_is_rejected(tmp_path, resnet18_file):
    _, state = resnet18_file
    state = dict(state, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    path = tmp_path / "reshaped.pth"
    torch.save(state, path)
    expected = r"reshaped.pth.*'layer2.0.conv1.weight' has shape \(128, 64, 1, 1\)"
    with pytest.raises(WsolbenchError, match=expected):
        build_backbone("resnet18", pretrained=path)


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly on any attempt to reach the network or to download."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture
def empty_hub_dir(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


@pytest.mark.parametrize("name, file_name", [
    ("resnet50", "resnet50-0676ba61.pth"),
    ("resnet18", "resnet18-f37072fd.pth"),
    ("vgg16", "vgg16-397923af.pth"),
    ("inception_v3", "inception_v3_google-0cc3c7bd.pth"),
])
def test_imagenet_without_cached_file_names_it_and_never_downloads(
    name, file_name, empty_hub_dir, no_network
):
    with pytest.raises(WsolbenchError) as error:
        build_on_meta(name, pretrained="imagenet")
    message = str(error.value)
    assert file_name in message and str(empty_hub_dir / "checkpoints") in message
    assert "--pretrained PATH" in message and "\n" not in message


def test_imagenet_loads_from_torchvision_cache_and_checks_the_hash(resnet18_file, empty_hub_dir, no_network):
    path, state = resnet18_file
    with open(path, "rb") as stream:
        data = stream.read()
    sha256 = hashlib.sha256(data).hexdigest()
    checkpoints = empty_hub_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / f"resnet18-{sha256[:8]}.pth").write_bytes(data)
    (checkpoints / "resnet18-00000000.pth").write_bytes(data)  # name says another hash

    backbone = resnet.resnet18(variant="cam", large_feature_map=True, insert=None)
    backbone.imagenet_weight_url = f"https://download.pytorch.org/models/resnet18-{sha256[:8]}.pth"
    load_pretrained(backbone, "imagenet")
    assert backbone.pretrained_info.source == "imagenet" and backbone.pretrained_info.sha256 == sha256
    torch.testing.assert_close(backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])

    backbone.imagenet_weight_url = "https://download.pytorch.org/models/resnet18-00000000.pth"
    with pytest.raises(WsolbenchError, match="resnet18-00000000.pth.*corrupt"):
        load_pretrained(backbone, "imagenet")


# --- insert points ---------------------------------------------------------------------------

class ShapeRecorder(nn.Module):
    """An identity that remembers the shapes it saw."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x


@pytest.mark.parametrize("name, large_feature_map, expected", [
    ("resnet18", True, {"layer3_block0": (256, 8), "layer4_block0": (512, 8), "layer4_end": (512, 8)}),
    ("resnet18", False, {"layer3_block0": (256, 4), "layer4_block0": (512, 4), "layer4_end": (512, 4)}),
    ("resnet50", True, {"layer3_block0": (1024, 8), "layer4_block0": (2048, 8), "layer4_end": (2048, 8)}),
    ("vgg16", True, {"pool3": (256, 8), "conv4_3": (512, 8), "conv5_3": (512, 8)}),
    ("vgg16", False, {"pool3": (256, 8), "conv4_3": (512, 8), "conv5_3": (512, 4)}),
    ("inception_v3", True, {"Mixed_5d": (288, 8), "Mixed_6e": (768, 8), "SPG_A3_2b": (1024, 8)}),
    # Spec §4.5: the Mixed_5d point is before the optional pool that follows it.
    ("inception_v3", False, {"Mixed_5d": (288, 8), "Mixed_6e": (768, 4), "SPG_A3_2b": (1024, 4)}),
])
def test_inserted_modules_see_their_insert_points(name, large_feature_map, expected):
    recorders = {point: ShapeRecorder() for point in expected}
    backbone = build_on_meta(name, variant="adl", large_feature_map=large_feature_map, insert=recorders)
    with torch.device("meta"):
        backbone(torch.empty(2, 3, 64, 64))
    for point, (channels, side) in expected.items():
        assert recorders[point].shapes == [(2, channels, side, side)], point


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "inception_v3"])
def test_identity_inserts_leave_the_output_unchanged(name):
    torch.manual_seed(0)
    points = EXPECTED_INSERT_POINTS[name]
    backbone = build_backbone(name, variant="adl", insert={p: nn.Identity() for p in points}).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with_identities, _ = backbone(images)
        backbone.inserted.clear()  # the same weights, nothing inserted
        plain, _ = backbone(images)
        torch.testing.assert_close(with_identities, plain, rtol=0, atol=0)
        # An inserted module really acts: doubling at the last point doubles F. (ResNet and
        # Inception: F is the ADL-modulated map itself, spec §4.5/§5.1; VGG: conv6 has bias 0
        # at init and ReLU is positively homogeneous.)
        backbone.inserted[points[-1]] = Doubler()
        torch.testing.assert_close(backbone(images)[0], 2 * plain)


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def test_inserted_parameters_stay_out_of_the_trunk_numbering():
    backbone = build_on_meta("resnet50", variant="adl", insert={"layer3_block0": nn.Conv2d(1024, 1024, 1)})
    inserted_keys = [key for key in backbone.state_dict() if key.startswith("inserted.")]
    assert inserted_keys == ["inserted.layer3_block0.weight", "inserted.layer3_block0.bias"]
    assert not any(key.startswith("inserted.") for key in backbone.pretrained_trunk_keys())
    assert "layer3.1.conv1.weight" in backbone.pretrained_trunk_keys()  # no index shift


def test_insert_at_an_unknown_point_is_rejected():
    with pytest.raises(ValueError, match="no insert point"):
        build_on_meta("resnet18", variant="cam", insert={"layer4_end": nn.Identity()})
    with pytest.raises(ValueError, match="no insert point"):
        build_on_meta("vgg16", variant="adl", insert={"pool5": nn.Identity()})


# --- learning-rate groups --------------------------------------------------------------------

def multipliers(backbone: Backbone, profile: str) -> dict[str, float]:
    return {name: backbone.lr_multiplier(name, profile) for name, _ in backbone.named_parameters()}


def test_resnet_lr_groups():
    backbone = build_on_meta("resnet50", variant="adl", insert={"layer4_end": nn.Conv2d(2048, 1, 1),
                                                                "layer3_block0": nn.Conv2d(1024, 1, 1)})
    we = multipliers(backbone, "WE")
    # Spec §3.1 WE: layer4 at ×10, everything else ×1; inserted modules follow their host stage.
    assert {name for name, m in we.items() if m == 10.0} == {
        name for name in we if name.startswith(("layer4.", "inserted.layer4_end."))}
    assert set(we.values()) == {1.0, 10.0}
    assert set(multipliers(backbone, "DA").values()) == {1.0}  # spec §3.1 DA: extractor ×1


def test_vgg_lr_groups():
    cam = build_on_meta("vgg16", variant="cam")
    assert {name for name, m in multipliers(cam, "WE").items() if m == 10.0} == {"conv6.weight", "conv6.bias"}
    # Spec §3.2 decision: profile DA follows DA24, conv6 at x10 as well.
    assert {name for name, m in multipliers(cam, "DA").items() if m == 10.0} == {"conv6.weight", "conv6.bias"}
    spg = multipliers(build_on_meta("vgg16", variant="spg"), "WE")
    assert spg["features.14.weight"] == 1.0  # conv3_3
    assert spg["features.17.weight"] == 10.0 and spg["features.28.bias"] == 10.0  # re-homed (§3.2)
    assert spg["SPG_A_3.2.weight"] == 10.0


@pytest.mark.parametrize("profile", ["WE", "DA"])
def test_inception_lr_groups(profile):
    backbone = build_on_meta("inception_v3", variant="adl", insert={"Mixed_6e": nn.Conv2d(768, 1, 1),
                                                                   "SPG_A3_2b": nn.Conv2d(1024, 1, 1)})
    groups = multipliers(backbone, profile)
    tens = {name for name, m in groups.items() if m == 10.0}
    assert tens == {name for name in groups if name.startswith(("SPG_A3_", "inserted.SPG_A3_2b."))}
    assert groups["Conv2d_1a_3x3.conv.weight"] == groups["Mixed_6e.branch_pool.bn.bias"] == 1.0


def test_lr_multiplier_rejects_unknown_names_and_profiles():
    backbone = build_on_meta("resnet18")
    with pytest.raises(KeyError, match="relative to the backbone"):
        backbone.lr_multiplier("backbone.layer4.0.conv1.weight", "WE")
    with pytest.raises(ValueError, match="profile"):
        backbone.lr_multiplier("layer4.0.conv1.weight", "CAM")


# --- init ------------------------------------------------------------------------------------

def test_init_is_xavier_except_he_for_resnet_acol():
    """Spec §3.1: xavier-uniform convs, BN 1/0; spec §4.3: ResNet-ACoL is He (fan_out)."""
    torch.manual_seed(0)
    weight_cam = build_backbone("resnet50", variant="cam").layer4[0].conv2.weight
    weight_acol = build_backbone("resnet50", variant="acol").layer4[0].conv2.weight
    fan_in = fan_out = 512 * 9
    xavier_bound = (6 / (fan_in + fan_out)) ** 0.5
    assert weight_cam.abs().max() <= xavier_bound
    assert weight_acol.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
