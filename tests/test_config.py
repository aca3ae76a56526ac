"""The one config system: recipe < TOML file < flags, and one-line errors naming the file."""
from __future__ import annotations

import pytest

from wsolbench.config import resolve_config
from wsolbench.errors import InputError, WsolbenchError


def test_precedence_is_recipe_then_file_then_flags(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text('epochs = 7\nlr = 0.5\n[method_options]\ndrop_rate = 0.3\n')
    config = resolve_config({"dataset": "CUB", "data_root": "d", "out": "o", "lr": 0.25, "uda": "mmd",
                             "method_options": {"gamma": 0.8}}, config_file)
    assert config.recipe == "spec §6.2 DA-WSOL CUB resnet50"  # CAM + DA-WSOL: the official script
    assert config.lambda2 == 2.0 and config.lr_decay_frequency == 30  # from the recipe
    assert config.epochs == 7  # the file beats the recipe's 50
    assert config.lr == 0.25  # the flag beats the file
    assert config.method_options == {"drop_rate": 0.3, "gamma": 0.8}


def test_a_bad_toml_line_is_named(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text("epochs = 7\nlr = = 1\n")
    with pytest.raises(InputError, match=rf"{config_file}:2: not valid TOML"):
        resolve_config({"dataset": "CUB", "data_root": "d", "out": "o"}, config_file)


def test_an_unknown_key_is_named(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text("epoch = 7\n")
    with pytest.raises(InputError, match=rf"{config_file}:1: unknown config key 'epoch'"):
        resolve_config({"dataset": "CUB", "data_root": "d", "out": "o"}, config_file)


def test_missing_required_values_are_listed():
    with pytest.raises(WsolbenchError, match="--data-root is required; --out is required"):
        resolve_config({"dataset": "CUB"})
