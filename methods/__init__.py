"""WSOL methods: backbones, one module per method (registered by name), and the DA-WSOL wrapper."""
from wsolbench.methods.registry import available_methods, method_class, register_method

# Each method module registers itself on import.
from wsolbench.methods import acol, adl, cam, cutmix, has, spg  # noqa: E402,F401

__all__ = ["available_methods", "method_class", "register_method"]
