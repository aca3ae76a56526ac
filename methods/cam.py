"""CAM (spec §4.1): the plain classifier; the loss is cross-entropy on the GAP logits.

Everything is the base class: this module only names it.
"""
from __future__ import annotations

from wsolbench.methods.base import WSOLMethod
from wsolbench.methods.registry import register_method


@register_method
class CAM(WSOLMethod):
    name = "cam"
