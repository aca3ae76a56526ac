"""The run identity: every field that changes results, and nothing else, names a run."""
from __future__ import annotations

import dataclasses

import pytest

from wsolbench.config import (DA_WSOL_FIELDS, IDENTIFIED_BY_CONTENT, IDENTITY_FIELDS, RUNTIME_FIELDS, TrainConfig, identity_change,
                              resolve_config, run_id, run_identity)


def test_every_config_field_is_classified_as_identity_or_runtime_exactly_once():
    # A new TrainConfig field must be added to one of the lists: does it change the results?
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    classified = [*IDENTITY_FIELDS, *RUNTIME_FIELDS, *IDENTIFIED_BY_CONTENT]
    assert sorted(classified) == sorted(fields)


def config(**overrides) -> TrainConfig:
    return resolve_config({"dataset": "SyntheticBoxes", "data_root": "images", "out": "runs/a", **overrides})


def other_value(value):
    """A different value of the same kind, to change one field with."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, dict):
        return {**value, "drop_rate": 0.5}
    return "elsewhere" if value in (None, "") else value + "-other"


@pytest.mark.parametrize("name", IDENTITY_FIELDS)
def test_changing_an_identity_field_changes_the_run_id(name):
    base = config(uda="mmd")  # with DA-WSOL on, its settings are identity too
    changed = dataclasses.replace(base, **{name: other_value(getattr(base, name))})
    assert run_id(run_identity(changed, None)) != run_id(run_identity(base, None))


@pytest.mark.parametrize("name", DA_WSOL_FIELDS)
def test_a_baseline_without_da_wsol_ignores_da_wsol_settings(name):
    base = config(uda="none")
    changed = dataclasses.replace(base, **{name: other_value(getattr(base, name))})
    assert run_id(run_identity(changed, None)) == run_id(run_identity(base, None))
    assert name not in run_identity(base, None)


@pytest.mark.parametrize("name", RUNTIME_FIELDS)
def test_changing_a_runtime_field_keeps_the_run_id(name):
    base = config()
    changed = dataclasses.replace(base, **{name: other_value(getattr(base, name))})
    assert run_identity(changed, None) == run_identity(base, None)


def test_pretrained_weights_are_identified_by_their_hash_not_their_location():
    by_name = config(pretrained="imagenet")
    by_path = config(pretrained="/somewhere/resnet18-f37072fd.pth")
    assert "pretrained" not in run_identity(by_name, "ab" * 32)
    assert run_id(run_identity(by_name, "ab" * 32)) == run_id(run_identity(by_path, "ab" * 32))
    assert run_id(run_identity(by_name, "ab" * 32)) != run_id(run_identity(by_name, "cd" * 32))
    assert run_identity(config(pretrained="none"), None)["pretrained_sha256"] is None


def test_run_id_is_sha256_of_canonical_json_whatever_the_key_order():
    # sha256(b'{"a":1,"b":[0.5,"x"],"c":{"d":null}}'), first 16 hex digits
    assert run_id({"a": 1, "b": [0.5, "x"], "c": {"d": None}}) == "952fdba4b560d332"
    assert run_id({"c": {"d": None}, "b": [0.5, "x"], "a": 1}) == "952fdba4b560d332"


def test_an_int_and_the_float_it_stands_for_are_one_identity():
    assert run_id(run_identity(config(lr=1), None)) == run_id(run_identity(config(lr=1.0), None))


def test_identity_change_names_every_differing_field_with_both_values():
    saved = run_identity(config(uda="mmd"), None)
    current = {**saved, "lambda1": 0.5, "lr": 0.0123}
    assert identity_change(saved, current) == (f"saved with lambda1={saved['lambda1']!r}, lr={saved['lr']!r}, "
                                               f"this run has lambda1=0.5, lr=0.0123")
    assert identity_change(saved, dict(saved)) is None
