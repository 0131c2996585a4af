"""Instance-level patching helpers: a patched module keeps its class, parameters and state_dict;
only its instance `forward` is overridden (and removed again by restore)."""

from __future__ import annotations

import types

from torch import nn

from fastlm import ops

PATCHED_FORWARD = "_fastlm_forward"


def set_forward(module: nn.Module, fn) -> None:
    module.__dict__["forward"] = fn
    module.__dict__[PATCHED_FORWARD] = True


def clear_forwards(model: nn.Module) -> None:
    for m in model.modules():
        if m.__dict__.pop(PATCHED_FORWARD, False):
            m.__dict__.pop("forward", None)


def _ln_forward(self, x):
    if x.dtype != self.weight.dtype or self.weight is None:
        return type(self).forward(self, x)
    return ops.layer_norm(x, self.weight, self.bias, self.eps)


def patch_layer_norm(ln: nn.LayerNorm) -> None:
    if isinstance(ln, nn.LayerNorm) and ln.elementwise_affine and ln.bias is not None and len(ln.normalized_shape) == 1:
        set_forward(ln, types.MethodType(_ln_forward, ln))
