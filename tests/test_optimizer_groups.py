"""The optimiser the trainer builds (spec §3 LR groups, §5.9 DANN, §6.1 schedule), read from the
optimiser's own param groups after `start_epoch`, parameters identified by identity."""
from __future__ import annotations

import pytest
import torch

from wsolbench.config import resolve_config
from wsolbench.experiment import build_model
from wsolbench.trainer import Trainer

LR, RATIO, DECAY_EVERY, WEIGHT_DECAY = 0.02, 7.0, 2, 3e-4


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(torch_threads):
    """Small tensors: 1 torch thread (conftest.torch_threads)."""
    yield from torch_threads(1)


def sgd_trainer(**values) -> Trainer:
    settings = dict(dataset="SyntheticBoxes", data_root="x", out="y", method="cam", backbone="resnet18",
                    pretrained="none", image_size=32, optimizer="sgd", lr=LR, lr_classifier_ratio=RATIO,
                    lr_decay_frequency=DECAY_EVERY, weight_decay=WEIGHT_DECAY, device="cpu")
    config = resolve_config({**settings, **values})
    return Trainer(build_model(config, num_classes=3), config, torch.device("cpu"))


def expected_multiplier(name: str, profile: str) -> tuple[float, bool]:
    """(LR multiplier, decays) of a parameter from the spec's name rules, independent of the code's."""
    if name.startswith("domain_classifier."):
        return RATIO, False  # spec §5.9: lr * lr_classifier_ratio, never decayed
    name = name.removeprefix("method.")
    if name.startswith("head."):
        return RATIO, True  # the classifier, both profiles (spec §3.1)
    if profile == "WE" and name.startswith("backbone.layer4."):
        return RATIO, True  # spec §3.1 WE: layer4 in the x10 group
    return 1.0, True


@pytest.mark.parametrize("profile, uda", [("DA", "none"), ("DA", "dann"), ("WE", "mmd")])
def test_param_group_lrs_follow_the_schedule_and_the_classifier_ratio(profile, uda):
    trainer = sgd_trainer(profile=profile, uda=uda)
    named = dict(trainer.model.named_parameters())
    group_of = {}
    for group in trainer.optimizer.param_groups:
        assert group["momentum"] == 0.9 and group["nesterov"] and group["weight_decay"] == WEIGHT_DECAY
        for parameter in group["params"]:
            assert id(parameter) not in group_of, "a parameter is in two groups"
            group_of[id(parameter)] = group
    assert set(group_of) == {id(p) for p in named.values()}, "every parameter is optimised"
    assert any(name.removeprefix("method.").startswith("head.") for name in named)
    assert any(name.startswith("domain_classifier.") for name in named) == (uda == "dann")

    for epoch in range(5):  # 0-based; spec §6.1: lr0 * 0.1^floor((epoch + 1) / f)
        returned = trainer.start_epoch(epoch)
        factor = 0.1 ** ((epoch + 1) // DECAY_EVERY)
        assert returned == pytest.approx(LR * factor, rel=1e-12)
        for name, parameter in named.items():
            multiplier, decays = expected_multiplier(name, profile)
            expected = LR * multiplier * (factor if decays else 1.0)
            assert group_of[id(parameter)]["lr"] == pytest.approx(expected, rel=1e-12), (epoch, name)
    # The factors themselves: epochs 1, 2-3, 4-5 (1-indexed) at 1, 0.1, 0.01.
    assert [0.1 ** ((e + 1) // DECAY_EVERY) for e in range(5)] == pytest.approx([1, .1, .1, .01, .01])


def test_the_classifier_ratio_is_the_configs_not_a_constant():
    trainer = sgd_trainer(profile="DA", lr_classifier_ratio=2.5)
    trainer.start_epoch(0)
    head = trainer.model.head.fc.weight
    extractor = trainer.model.backbone.conv1.weight
    lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lrs[id(head)] == pytest.approx(LR * 2.5) and lrs[id(extractor)] == pytest.approx(LR)
