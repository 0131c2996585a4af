"""CPULinear: an nn.Linear whose CPU forward runs fastlm._C's linear (oneDNN for prefill /
encoder rows, see csrc/linear_cpu.cpp), for the projections that are not an FFN (BERT's fused
QKV and attention output). Parameters, state_dict and `.to()` are nn.Linear's own: only the
forward differs, and on other devices or without fastlm._C it is nn.Linear's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm import _ext


class CPULinear(nn.Linear):
    """nn.Linear(in_features, out_features, bias); x (..., in) -> (..., out). On CPU tensors with
    fastlm._C loaded: torch.ops.fastlm.linear_ext (oneDNN for fp32 with >= 32 rows, else ATen's
    addmm); elsewhere F.linear."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and _ext.available() and not torch.is_grad_enabled():
            return torch.ops.fastlm.linear_ext(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
