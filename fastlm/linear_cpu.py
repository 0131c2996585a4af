"""CPULinear: an nn.Linear whose CPU forward runs fastlm._C's linear (oneDNN for prefill /
encoder rows, see csrc/linear_cpu.cpp), for BERT's projections (fused QKV, attention output and
both FFN linears). Parameters, state_dict and `.to()` are nn.Linear's own: only the forward
differs, and on other devices or without fastlm._C it is nn.Linear's forward.

On CPU in float32 or bfloat16 the weight is also reordered once into oneDNN's blocked layout (mkldnn tensor,
`torch.ops.mkldnn._reorder_linear_weight`, as inductor's CPU freezing does) the first time the
layer runs, and reused by every later call: oneDNN otherwise reorders the plain (N, K) weight on
each call (measured: BERT-base B8 S128 447 -> 425 ms). The packed copy is rebuilt when the weight
changes (another tensor, an in-place update, `.to()`); it costs a second copy of the weight. A
weight that is an inference tensor (made under torch.inference_mode) has no version counter, so
its in-place updates cannot be seen: it is never packed (oneDNN reorders it on each call).

Where fastlm._C runs AVX2 (an AVX2-only CPU, or FASTLM_CPU_ISA=avx2), the packed copy is fastlm's
16-channel panels instead, and float32 rows on one intra-op thread (a chunk of a batch split over
threads) go to fastlm's own packed GEMM (torch.ops.fastlm.packed_linear, csrc/gemv.cpp's register
tiles): measured faster than oneDNN's AVX2 kernels there (see `tiles_here`); with more intra-op
threads oneDNN runs on the plain weight.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm import _ext

ACTIVATIONS = (None, "gelu", "gelu_tanh")


def onednn_packable() -> bool:
    """Whether this torch can pack fp32 linear weights for oneDNN (built with oneDNN, enabled)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.cache
def onednn_bf16_ok() -> bool:
    """Whether oneDNN runs a bf16 linear in this process, probed once: it has no bf16 inner product
    below AVX-512 (an AVX2 CPU, or ONEDNN_MAX_CPU_ISA=AVX2), where bf16 linears run ATen's addmm."""
    if not onednn_packable():
        return False
    try:
        x, w = torch.ones(32, 16, dtype=torch.bfloat16), torch.ones(8, 16, dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return True
    except RuntimeError:
        return False


def _version(w: Tensor) -> int | None:
    """w's version counter, or None for an inference tensor, which has none: updated in place
    inside torch.inference_mode (e.g. load_state_dict there) it changes unseen."""
    try:
        return w._version
    except RuntimeError:
        return None


class CPULinear(nn.Linear):
    """nn.Linear(in_features, out_features, bias); forward(x, *, activation=None | "gelu" |
    "gelu_tanh", residual=None) = act(x @ W^T + b) + residual, x (..., in) -> (..., out). On CPU
    tensors with fastlm._C loaded and autograd off: torch.ops.fastlm.linear_ext (oneDNN on the
    packed weight for fp32 or bf16 (oneDNN's bf16 matmul, fp32 accumulation) with >= 32 rows, the
    activation / residual fused into the GEMM's output pass; else ATen's addmm), or, for float32
    where fastlm._C runs AVX2, torch.ops.fastlm.packed_linear on fastlm's panels with one intra-op
    thread and linear_ext on the plain weight with more (see tiles_here); elsewhere F.linear.
    A residual with an activation is refused (ValueError): no model needs it."""

    _packed: Tensor | None = None
    _packed_key: tuple | None = None
    _panels: Tensor | None = None
    _panels_key: tuple | None = None

    def onednn_weight(self) -> Tensor | None:
        """The weight reordered for oneDNN (a float32 or bfloat16 mkldnn tensor, the weight's dtype),
        built on first use and kept while the weight is unchanged; None where it cannot run (not CPU
        float32 / bfloat16, no oneDNN)."""
        w = self.weight
        if (w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or w.dim() != 2
                or not onednn_packable()):
            return None
        if w.dtype == torch.bfloat16 and not onednn_bf16_ok():
            return None
        version = _version(w)
        if version is None:  # no way to tell an in-place update: no packed copy (oneDNN reorders per call)
            self._packed = self._packed_key = None
            return None
        key = (w.data_ptr(), version, tuple(w.shape), tuple(w.stride()))
        if self._packed_key != key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())
            self._packed_key = key
        return self._packed

    def panels(self) -> Tensor | None:
        """The float32 weight packed into fastlm's 16-channel panels (fastlm.linear.pack_panels), built on
        first use and kept while the weight is unchanged (as onednn_weight); for an inference-tensor weight
        (no version counter: its in-place updates cannot be seen) packed anew on every call, not kept."""
        w = self.weight
        version = _version(w)
        key = (w.data_ptr(), version, tuple(w.shape), tuple(w.stride()))
        if version is None or self._panels_key != key:
            from fastlm.linear import pack_panels

            with torch.no_grad():
                panels = pack_panels(w.detach())
            if version is None:
                return panels
            self._panels, self._panels_key = panels, key
        return self._panels

    def panels_layout(self, x: Tensor) -> bool:
        """Whether this layer keeps its float32 weight as fastlm's panels (its one packed copy) instead
        of oneDNN's reorder: fastlm._C runs AVX2 (an AVX2-only CPU, or FASTLM_CPU_ISA=avx2)."""
        return (x.dtype == torch.float32 and self.weight.dtype == torch.float32 and self.weight.dim() == 2
                and x.numel() > 0 and not torch.compiler.is_compiling() and torch.ops.fastlm.cpu_isa("") == "avx2")

    def tiles_here(self, x: Tensor) -> bool:
        """Whether float32 x runs fastlm's packed GEMM on the panels: the panels layout and one intra-op
        thread (a chunk of a batch split over threads, fastlm/cpu_split.py, or a one-thread process).
        Measured 2026-12-07 on the Zen 4 capped at AVX2, BERT-base B8 S128 float32, one process
        alternating: one thread 0.92x the time of oneDNN's AVX2 GEMMs on its reordered weight (GEMMs
        alone at M 512: 107-111 vs 103-109 GFLOP/s); 2 threads with the batch split 0.91x (best; median
        0.90x) of oneDNN split over both threads per op, while the packed GEMM split over 2 threads per
        op took 1.37x: with more intra-op threads oneDNN runs, on the plain weight (reordered per call:
        B1 S128 ~5% slower than on a kept reorder, no second copy). At AVX-512 oneDNN stays (108-112 vs
        100-104 GFLOP/s)."""
        return self.panels_layout(x) and torch.get_num_threads() == 1

    def fused_ready(self, x: Tensor) -> bool:
        """Whether forward(x, activation=..., residual=...) runs fastlm._C's fused linear."""
        return x.device.type == "cpu" and _ext.available() and not torch.is_grad_enabled()

    def forward(self, x: Tensor, *, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
        if activation is not None and residual is not None:
            raise ValueError("CPULinear: a residual add after an activation is not supported")
        if self.fused_ready(x):
            if self._bf16_as_fp32(x):
                return self._forward_bf16_as_fp32(x, activation, residual)
            if self.panels_layout(x):
                if torch.get_num_threads() == 1:  # tiles_here
                    return torch.ops.fastlm.packed_linear(x, self.panels(), self.out_features, None, self.bias,
                                                          residual, activation or "none")
                return torch.ops.fastlm.linear_ext(x, self.weight, self.bias, None, activation or "none", residual)
            packed = None  # under torch.compile the plain weight (oneDNN reorders it per call)
            if x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
                packed = self.onednn_weight()
            return torch.ops.fastlm.linear_ext(x, self.weight, self.bias, packed, activation or "none", residual)
        y = F.linear(x, self.weight, self.bias)
        if activation is not None:
            y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
        return y if residual is None else y + residual

    def _bf16_as_fp32(self, x: Tensor) -> bool:
        """bf16 encoder rows where oneDNN has no bf16 inner product (below AVX-512, or
        ONEDNN_MAX_CPU_ISA=AVX2): ATen's bf16 addmm there ran BERT-base's 1024 x 768 -> 3072 GELU
        linear 2.3x slower than oneDNN's fp32 GEMM on fp32 copies of x and W made per call (AVX2 caps,
        2 threads, loaded Zen 4, 2026-12-07: 664-876 vs 284-369 ms). No fp32 copy of W is kept."""
        return (x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.dim() >= 2
                and x.numel() // x.shape[-1] >= 32 and onednn_packable() and not onednn_bf16_ok()
                and not torch.compiler.is_compiling())

    def _forward_bf16_as_fp32(self, x: Tensor, activation: str | None, residual: Tensor | None) -> Tensor:
        """act(x @ W^T + b) + residual in fp32 (oneDNN, fused epilogue) on fp32 copies, rounded to bf16
        once at the end: fp32 accumulation as the bf16 contract asks."""
        b = None if self.bias is None else self.bias.float()
        r = None if residual is None else residual.float()
        y = torch.ops.fastlm.linear_ext(x.float(), self.weight.float(), b, None, activation or "none", r)
        return y.to(torch.bfloat16)

    def _apply(self, fn, recurse=True):  # .to() / .half() / .cuda(): drop the packed copies (rebuilt on use)
        self._packed = self._packed_key = self._panels = self._panels_key = None
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copy / pickle without the packed copy (rebuilt on first use)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        state.pop("_panels", None)
        state.pop("_panels_key", None)
        return state
