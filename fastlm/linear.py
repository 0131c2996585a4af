"""Linear layers laid out for fastlm's kernels: packed fp32 and int8 weight-only for decode
(fastlm._C `packed_linear`), int8 with dynamic per-token activations (torch's int8 GEMM).

Every class takes x (..., in_features) and returns (..., out_features), like nn.Linear, with two
fused epilogues: forward(x, *, activation=None | "gelu" | "gelu_tanh", residual=None) computes
act(x @ W^T + b) + residual.

Layouts (made once, when the module is built or moved; .to() / .cuda() / .half() re-lay out):
- CPU: panels of 16 output channels, (ceil(N / 16), K, 16), zero-padded past N. The CPU kernel
  streams them contiguously (csrc/gemv.cpp). bfloat16 weights: "pair panels"
  (ceil(N / 16), ceil(K / 2), 32), two k's of 16 channels per 64-byte row, the operand layout of
  vdpbf16ps (csrc/gemv_bf16.cpp, pack_bf16_panels).
- CUDA and anything else: plain (N, K) row-major, as nn.Linear.

int8 quantization (fastlm.quantize): per output channel, symmetric, scale = absmax / 127,
q = round(w / scale) clamped to [-127, 127]; an all-zero row gets scale 0 (and q = 0). The scale
stays float32 whatever the model dtype. No full-precision copy of a quantized weight is kept.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm import _ext, cpu_features

log = logging.getLogger("fastlm")


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact. On CPU the path is
    fastlm.cpu_features.int8_gemm_path(): torch._int_mm where the CPU has an int8 dot-product
    instruction and torch's sums are exact; fastlm._C's AVX2 int8 GEMM (csrc/quant_avx2.cpp, exact
    int32 sums, b packed per call; Int8DynamicLinear keeps its weight in that kernel's int8 pair
    panels there instead) where it has none or fastlm's ISA is capped at AVX2; else a
    float64 product, exact for |sums| < 2^53 (here < 127 * 127 * K)."""
    if a.device.type != "cpu":
        return torch._int_mm(a, b)
    path = cpu_features.int8_gemm_path()
    if path == "fastlm_avx2":
        return torch.ops.fastlm.int8_gemm_avx2(a, b)
    if path in ("torch._int_mm", "fastlm_vnni"):  # fastlm_vnni's kernel reads packed quads (Int8DynamicLinear)
        return torch._int_mm(a, b)
    return (a.double() @ b.double()).to(torch.int32)

PANEL = 16  # output channels per CPU panel (csrc/gemv.cpp kNR)
# float32 prefill (more rows than PREFILL_ROWS) on AVX2 runs gemv.cpp's register tiles, the decode
# kernels: since they keep their accumulators in registers they ran 1.06-1.21x the cache-blocked
# csrc/gemm_avx2.cpp they replaced (one Zen 4 core capped at AVX2, thread CPU time, M 128-2048 x 768 /
# 3072) and a GPT-2 32 x 16-token prefill took 0.86x the CPU time; docs/design.md.
PREFILL_ROWS = 16
ACTIVATIONS = (None, "gelu", "gelu_tanh")


HUGEPAGE_MIN_BYTES = 2 << 20  # panels from one 2 MiB huge page up go to huge-page memory


def pack_panels(w: Tensor) -> Tensor:
    """(N, K) -> (ceil(N / 16), K, 16) contiguous: panel p holds channels 16p..16p+15
    interleaved along K (zeros past N). On CPU with fastlm._C, panels of 2 MiB or more live in
    memory advised for transparent huge pages (torch.ops.fastlm.hugepage_copy): the decode GEMV
    streams them once per token, and 4 KiB pages stop the hardware prefetchers at every page."""
    N, K = w.shape
    nb = -(-N // PANEL)
    wp = w.new_zeros(nb * PANEL, K)
    wp[:N] = w
    packed = wp.view(nb, PANEL, K).transpose(1, 2)  # (nb, K, 16)
    big = packed.numel() * packed.element_size() >= HUGEPAGE_MIN_BYTES
    if big and packed.device.type == "cpu" and _ext.available():
        return torch.ops.fastlm.hugepage_copy(packed)
    return packed.contiguous()


def _hugepage(packed: Tensor) -> Tensor:
    big = packed.numel() * packed.element_size() >= HUGEPAGE_MIN_BYTES
    if big and packed.device.type == "cpu" and _ext.available():
        return torch.ops.fastlm.hugepage_copy(packed)
    return packed.contiguous()


def pack_bf16_panels(w: Tensor) -> Tensor:
    """(N, K) bfloat16 -> pair panels (ceil(N / 16), ceil(K / 2), 32) bfloat16, contiguous:
    element [p, kk, 2j + t] = w[16p + j, 2kk + t], zeros past N and K (the layout of
    csrc/gemv_bf16.cpp; huge-page memory from 2 MiB up, as pack_panels)."""
    if w.dtype != torch.bfloat16 or w.dim() != 2:
        raise ValueError(f"pack_bf16_panels: w must be 2-D bfloat16, got {w.dtype} of shape {tuple(w.shape)}")
    N, K = w.shape
    nb, k2 = -(-N // PANEL), -(-K // 2)
    wp = w.new_zeros(nb * PANEL, 2 * k2)
    wp[:N, :K] = w
    packed = wp.view(nb, PANEL, k2, 2).permute(0, 2, 1, 3)  # (nb, k2, 16, 2)
    return _hugepage(packed).view(nb, k2, 2 * PANEL)


def share_arena_(linears, attr: str = "packed") -> None:
    """Move the CPU panels `attr` ("packed" of PackedLinear, "qweight" of Int8Linear) of `linears`
    (in the order a decode step reads them) into one contiguous huge-page allocation, each module's
    buffer a view of it: the step then streams one run of memory. Measured on Zen 4 (one thread, CPU
    time, the 48 bf16 GEMVs of GPT-2 small, same process): 20 GB/s from separate allocations, 28 GB/s
    from one arena (the 1.2 MB attention projections sit below the 2 MiB huge-page floor when alone;
    int8: the 1.8 MB c_attn and 0.6 MB attn.c_proj panels, see docs/design.md "CPU threads"). A no-op
    with fewer than two, without fastlm._C, or when they already share one allocation."""
    ps = [m for m in linears if getattr(m, attr, None) is not None and getattr(m, attr).device.type == "cpu"]
    if len(ps) < 2 or not _ext.available() or len({getattr(m, attr).dtype for m in ps}) != 1:
        return
    if len({getattr(m, attr).untyped_storage().data_ptr() for m in ps}) == 1:
        return
    arena = torch.ops.fastlm.hugepage_copy(torch.cat([getattr(m, attr).reshape(-1) for m in ps]))
    off = 0
    for m in ps:
        t = getattr(m, attr)
        n = t.numel()
        # fp32 / bf16 panels are 16- / 32-element rows, int8 pair panels 32-byte rows: each view starts
        # 32-byte aligned at least (the kernels use unaligned loads)
        setattr(m, attr, arena[off:off + n].view(t.shape))
        off += n


def unpack_bf16_panels(p: Tensor, n: int, k: int) -> Tensor:
    """Inverse of pack_bf16_panels: (nb, ceil(k / 2), 32) -> (n, k) contiguous."""
    nb, k2, _ = p.shape
    return p.view(nb, k2, PANEL, 2).permute(0, 2, 1, 3).reshape(nb * PANEL, 2 * k2)[:n, :k].contiguous()


def pack_int8_panels(q: Tensor) -> Tensor:
    """(N, K) int8 -> pair panels (ceil(N / 16), ceil(K / 2), 32) int8, contiguous: element
    [p, kk, 2j + t] = q[16p + j, 2kk + t], zeros past N and K (the bf16 pair panels' layout): the
    two weights of a channel at k = 2kk, 2kk + 1 sit side by side, as the int16 dot products of the
    int8 decode GEMV read them (vpmaddwd / vpdpwssd, csrc/gemv.cpp "int8 pair panels"). The one
    weight layout of Int8Linear on CPU; huge-page memory from 2 MiB up, as pack_panels."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int8_panels: q must be 2-D int8, got {q.dtype} of shape {tuple(q.shape)}")
    N, K = q.shape
    nb, k2 = -(-N // PANEL), -(-K // 2)
    wp = q.new_zeros(nb * PANEL, 2 * k2)
    wp[:N, :K] = q
    packed = wp.view(nb, PANEL, k2, 2).permute(0, 2, 1, 3)  # (nb, k2, 16, 2)
    return _hugepage(packed).view(nb, k2, 2 * PANEL)


def pack_int8_quads(q: Tensor) -> Tensor:
    """(N, K) int8 -> quad panels (ceil(N / 16), ceil(K / 4), 64) uint8, contiguous: element
    [p, kk, 4j + t] = q[16p + j, 4kk + t] + 128 (128, a zero weight, past N and K): the four weights
    of a channel at k = 4kk..4kk + 3 side by side, offset to unsigned, as AVX-512 VNNI's vpdpbusd
    reads its unsigned operand (csrc/int8_gemm_vnni.cpp). Int8DynamicLinear's weight layout where
    cpu_features.int8_gemm_path() == "fastlm_vnni"."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int8_quads: q must be 2-D int8, got {q.dtype} of shape {tuple(q.shape)}")
    N, K = q.shape
    nb, k4 = -(-N // PANEL), -(-K // 4)
    wp = torch.full((nb * PANEL, 4 * k4), 128, dtype=torch.uint8, device=q.device)
    wp[:N, :K] = (q.to(torch.int16) + 128).to(torch.uint8)
    packed = wp.view(nb, PANEL, k4, 4).permute(0, 2, 1, 3)  # (nb, k4, 16, 4)
    return _hugepage(packed).view(nb, k4, 4 * PANEL)


def unpack_int8_quads(p: Tensor, n: int, k: int) -> Tensor:
    """Inverse of pack_int8_quads: (nb, k4, 64) uint8 -> (n, k) int8 contiguous."""
    nb, k4, _ = p.shape
    w = p.view(nb, k4, PANEL, 4).permute(0, 2, 1, 3).reshape(nb * PANEL, 4 * k4)[:n, :k]
    return (w.to(torch.int16) - 128).to(torch.int8).contiguous()


def unpack_int8_panels(p: Tensor, n: int, k: int) -> Tensor:
    """Inverse of pack_int8_panels (and of pack_panels for (nb, K, 16) int8 panels): -> (n, k)."""
    if p.shape[-1] == PANEL:
        return unpack_panels(p, n)
    return unpack_bf16_panels(p, n, k)


def unpack_panels(p: Tensor, n: int) -> Tensor:
    """Inverse of pack_panels: (nb, K, 16) -> (n, K) contiguous."""
    nb, K, _ = p.shape
    return p.transpose(1, 2).reshape(nb * PANEL, K)[:n].contiguous()


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: w (N, K) -> (q int8 (N, K), scale float32 (N,)) with
    scale = absmax / 127 and q = round(w / scale) clamped to [-127, 127] (round half to even, as
    torch.round); all-zero rows get scale 0 and q 0. Dequantized: q * scale[:, None]."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _act_name(activation: str | None) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
    return "none" if activation is None else activation


def _epilogue(y: Tensor, activation: str | None, residual: Tensor | None) -> Tensor:
    """Reference epilogue for the paths without a fused kernel."""
    if activation is not None:
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y if residual is None else y + residual


def _cpu_kernel_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and _ext.available()


class FastLinear(nn.Module):
    """Base of fastlm's linear layers: in_features, out_features, bias (model dtype or None)."""

    in_features: int
    out_features: int

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def fused_ready(self, x: Tensor) -> bool:
        """Whether forward(x, activation=..., residual=...) runs a fused kernel for x (else the
        model's other fused paths, e.g. ops.ffn on plain weights, are the better choice)."""
        raise NotImplementedError


def _cpu_bf16_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and _ext.available()


class PackedLinear(FastLinear):
    """An fp32 or bf16 nn.Linear packed for the CPU decode kernels. On CPU in float32 the weight
    lives only as panels (`packed`, csrc/gemv.cpp); in bfloat16 only as pair panels (csrc/gemv_bf16.cpp:
    bf16 weights, fp32 accumulation; x float32 or bfloat16, y in x's dtype); on other devices /
    dtypes only as the plain (N, K) `weight`, so the model's usual GPU paths read it as an nn.Linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"PackedLinear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach())
        self.register_buffer("packed", None)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._relayout()

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> PackedLinear:
        return cls(lin.weight, lin.bias)

    def _relayout(self) -> None:
        t = self.packed if self.packed is not None else self.weight
        want = t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and _ext.available()
        with torch.no_grad():
            if want and self.packed is None:
                w = self.weight
                self.packed = pack_bf16_panels(w) if w.dtype == torch.bfloat16 else pack_panels(w)
                self.weight = None
            elif not want and self.packed is not None:
                self.weight, self.packed = self.dense_weight(), None

    def _apply(self, fn, recurse=True):
        if self.packed is not None:  # fn (.to(dtype) / .cuda() ...) sees the plain (N, K) weight, never panels
            with torch.no_grad():
                self.weight, self.packed = self.dense_weight(), None
        super()._apply(fn, recurse)
        self._relayout()
        return self

    def fused_ready(self, x: Tensor) -> bool:
        if self.packed is None:
            return False
        return _cpu_bf16_ok(x) if self.packed.dtype == torch.bfloat16 else _cpu_kernel_ok(x)

    def dense_weight(self) -> Tensor:
        """The (N, K) weight (a copy when packed)."""
        if self.weight is not None:
            return self.weight
        if self.packed.dtype == torch.bfloat16:
            return unpack_bf16_panels(self.packed, self.out_features, self.in_features)
        return unpack_panels(self.packed, self.out_features)

    def forward(self, x: Tensor, *, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
        act = _act_name(activation)
        if self.packed is not None and self.packed.dtype == torch.bfloat16 and _cpu_bf16_ok(x):
            return torch.ops.fastlm.packed_linear_bf16(x, self.packed, self.out_features, self.bias, residual, act)
        if self.packed is not None and _cpu_kernel_ok(x):
            return torch.ops.fastlm.packed_linear(x, self.packed, self.out_features, None, self.bias, residual, act)
        return _epilogue(F.linear(x, self.dense_weight(), self.bias), activation, residual)


class Int8Linear(FastLinear):
    """Weight-only int8 linear: `qweight` int8 (CPU pair panels (ceil(N/16), ceil(K/2), 32),
    pack_int8_panels; elsewhere (N, K)), `scale` float32 (N,), `bias` in the model dtype. The output
    equals F.linear(x, q * scale[:, None], bias) up to fp32 rounding for prefill (more than 16 rows)
    and on CUDA; the CPU decode GEMV (up to 16 rows) quantizes each activation row to int16 per
    block of 64 elements (scale absmax / 32767, round to nearest) and sums int8 x int16 products in
    int32: its extra error is at most sum over blocks of absmax_b / 65534 * sum_k |q * scale| (a
    relative 2^-16 of each block's absmax; torch.ops.fastlm.int8_gemv_mode(0) keeps fp32
    activations). CPU prefill widens each int8 panel to its exact fp32 values once per block of 96
    rows (on AVX-512 / AVX2 inside the block's first register tile) and runs the fp32 register tiles
    on it: about the rate of fp32 panels (PackedLinear) from 17 rows on, the same fp32 rounding.
    CPU int8 panels in the older (ceil(N/16), K, 16) layout (pack_panels) still run.
    Kernels: CPU float32 (fastlm._C packed_linear, AVX-512 VNNI / AVX-512BW / AVX2 / portable) and
    CUDA fp16/bf16/fp32 (the int8 GEMV for M <= 16 rows; prefill dequantises into a temporary and
    runs cuBLAS)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Int8Linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._relayout()

    @classmethod
    def from_linear(cls, lin: nn.Module) -> Int8Linear:
        w = lin.dense_weight() if isinstance(lin, PackedLinear) else lin.weight
        return cls(w, lin.bias)

    def _relayout(self) -> None:
        cpu = self.qweight.device.type == "cpu"
        with torch.no_grad():
            if cpu and self.qweight.dim() == 2:
                self.qweight = pack_int8_panels(self.qweight)
            elif not cpu and self.qweight.dim() == 3:
                self.qweight = unpack_int8_panels(self.qweight, self.out_features, self.in_features)

    def _apply(self, fn, recurse=True):
        scale = self.scale  # stays float32: .half() must not round the scales
        super()._apply(fn, recurse)
        self.scale = scale.to(self.qweight.device)
        self._relayout()
        return self

    def dequantized(self) -> Tensor:
        """q * scale as (N, K) float32 (what the model computes with; for tests and fallbacks)."""
        q = self.qweight if self.qweight.dim() == 2 else unpack_int8_panels(self.qweight, self.out_features,
                                                                             self.in_features)
        return q.float() * self.scale[:, None]

    def _kernel_ok(self, x: Tensor) -> bool:
        if x.device.type == "cuda":
            return _ext.cuda_enabled() and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return _cpu_kernel_ok(x)

    def fused_ready(self, x: Tensor) -> bool:
        return self._kernel_ok(x)

    def forward(self, x: Tensor, *, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
        act = _act_name(activation)
        if self._kernel_ok(x):
            return torch.ops.fastlm.packed_linear(x, self.qweight, self.out_features, self.scale, self.bias,
                                                  residual, act)
        w = self.dequantized().to(x.dtype)
        return _epilogue(F.linear(x, w, self.bias), activation, residual)


class Int8Rows(NamedTuple):
    """Activations quantized per token for an Int8DynamicLinear: q (M, K) int8, scale (M,) float32,
    x[m] ~ q[m] * scale[m] (scale = absmax(x[m]) / 127, 1 for an all-zero row). With outlier
    channels (`outliers`, int64 (n_o,), see Int8DynamicLinear) the absmax leaves them out, q is 0
    there and xo (M, n_o) float32 holds their values; without, xo and outliers are None."""

    q: Tensor
    scale: Tensor
    xo: Tensor | None = None
    outliers: Tensor | None = None


def same_channels(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two outlier channel sets (int64 (n_o,) or None) are the same."""
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and torch.equal(a, b))


class Int8DynamicLinear(FastLinear):
    """int8 weights (as Int8Linear) with dynamic per-token int8 activations:
    x_scale[m] = absmax(x[m]) / 127, xq = round(x / x_scale) in [-127, 127], then an exact int8 GEMM
    with int32 accumulation (cpu_features.int8_gemm_path(): fastlm's AVX-512 VNNI or AVX2 kernel, or
    torch._int_mm), y = acc * x_scale[m] * scale[n] + b.

    Outlier channels (`outliers`: int64 (n_o,) input channels, or None; chosen by fastlm.quantize_
    at quantization time): an LLM.int8()-style decomposition (Dettmers et al. 2022,
    arXiv:2208.07339) with a static channel set. Those channels stay out of the int8 rows (not in
    x_scale's absmax, q = 0 there) and out of the int8 weight (its columns are zero before the
    per-channel quantization), and their product is float32:
    y = acc * x_scale[m] * scale[n] + x[:, outliers] @ w_out + b, w_out (n_o, N) float32 the
    original columns. The int8 weight stays the only copy of the others.

    `qweight`, the one copy of the int8 weight, in the layout of the CPU's int8 GEMM (chosen when the
    module is built or moved, `.to()`): where that GEMM is fastlm's AVX-512 VNNI / AMX-INT8 kernel
    (int8_gemm_path() == "fastlm_vnni") uint8 quad panels (ceil(N / 16), ceil(K / 4), 64) of w + 128
    (pack_int8_quads), and each linear is one op, the GEMM made block by block with its epilogue
    (torch.ops.fastlm.int8_linear_vnni*, a new float32 output); where it is fastlm's AVX2 kernel
    ("fastlm_avx2": no int8 dot-product instruction, or fastlm._C's ISA capped at AVX2) int8 pair panels
    (ceil(N / 16), ceil(K / 2), 32) (pack_int8_panels, Int8Linear's layout), read without a per-call
    pack (torch.ops.fastlm.int8_gemm_avx2_panels); elsewhere (N, K) viewed from (K, N) row-major
    memory, the layout torch._int_mm reads without a per-call transpose. state_dict holds that layout;
    load_state_dict takes any of the three (of this module's size). With fastlm._C the quantization
    and the epilogue (scales, outlier product, bias, GELU, residual) are one fused pass each
    (csrc/quant_cpu.cpp); off the VNNI path the epilogue writes its float32 result over the GEMM's
    int32 output (same size: no second buffer); without fastlm._C, torch ops compute the same.
    `next_outliers`: the outlier set of the int8 linear this one's LayerNorm'd output feeds
    (forward_add_layer_norm), set by fastlm.quantize_. CPU float32 only."""

    def __init__(self, weight: Tensor, bias: Tensor | None, outliers: Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Int8DynamicLinear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        w_out = None
        if outliers is not None:
            outliers = torch.as_tensor(outliers, dtype=torch.int64, device=weight.device).flatten()
            if outliers.numel() == 0:
                outliers = None
            elif (outliers.min() < 0 or outliers.max() >= self.in_features
                  or outliers.unique().numel() != outliers.numel()):
                raise ValueError(f"Int8DynamicLinear: outliers must be distinct input channels in "
                                 f"[0, {self.in_features}), got {outliers.tolist()}")
        if outliers is not None:
            wf = weight.detach().float()
            w_out = wf[:, outliers].t().contiguous()  # (n_o, N) float32
            weight = wf.clone()
            weight[:, outliers] = 0
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q.t().contiguous().t())  # (N, K) view of (K, N) memory
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer("outliers", outliers)
        self.register_buffer("w_out", w_out)
        self.register_buffer("next_outliers", None)
        self._relayout()

    @classmethod
    def from_linear(cls, lin: nn.Module, outliers: Tensor | None = None) -> Int8DynamicLinear:
        w = lin.dense_weight() if isinstance(lin, PackedLinear) else lin.weight
        return cls(w, lin.bias, outliers)

    def extra_repr(self) -> str:
        n_o = 0 if self.outliers is None else self.outliers.numel()
        return f"{super().extra_repr()}, outlier_channels={n_o}"

    def _apply(self, fn, recurse=True):
        scale, w_out = self.scale, self.w_out  # float32 whatever the model dtype
        super()._apply(fn, recurse)
        self.scale = scale.to(self.qweight.device)
        if w_out is not None:
            self.w_out = w_out.to(self.qweight.device)
        self._relayout()
        return self

    def _layout_here(self, device: torch.device) -> str:
        """The weight layout this module keeps on `device`: "quads" (pack_int8_quads, uint8) where the
        int8 GEMM is fastlm's VNNI kernel, "pairs" (pack_int8_panels) where it is fastlm's AVX2 kernel,
        else "nk" ((N, K) view of (K, N) memory, what torch._int_mm reads)."""
        if device.type != "cpu":
            return "nk"
        path = cpu_features.int8_gemm_path()
        return "quads" if path == "fastlm_vnni" else "pairs" if path == "fastlm_avx2" else "nk"

    @staticmethod
    def _layout_of(q: Tensor) -> str:
        if q.dim() == 2:
            return "nk"
        return "quads" if q.dtype == torch.uint8 else "pairs"

    def _nk(self, q: Tensor) -> Tensor:
        """An int8 weight in any layout -> (N, K) int8."""
        layout = self._layout_of(q)
        if layout == "quads":
            return unpack_int8_quads(q, self.out_features, self.in_features)
        if layout == "pairs":
            return unpack_int8_panels(q, self.out_features, self.in_features)
        return q

    def _in_layout(self, q: Tensor) -> Tensor:
        """An int8 weight, in any of the layouts, in the layout this module keeps on q's device."""
        want = self._layout_here(q.device)
        if self._layout_of(q) == want and (want != "nk" or q.t().is_contiguous()):
            return q
        q = self._nk(q)
        if want == "quads":
            return pack_int8_quads(q)
        if want == "pairs":
            return pack_int8_panels(q)
        return q if q.t().is_contiguous() else q.t().contiguous().t()  # (N, K) view of (K, N) memory

    def _relayout(self) -> None:
        with torch.no_grad():
            self.qweight = self._in_layout(self.qweight)

    def _shape_in(self, layout: str) -> tuple[int, ...]:
        """qweight's shape in `layout` for this module's (out_features, in_features)."""
        N, K, nb = self.out_features, self.in_features, -(-self.out_features // PANEL)
        return {"nk": (N, K), "pairs": (nb, -(-K // 2), 2 * PANEL), "quads": (nb, -(-K // 4), 4 * PANEL)}[layout]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        q = state_dict.get(key)
        # saved where another layout ran: relaid out, but only when it is this module's size in its own
        # layout (unpacking slices to (N, K): a larger saved weight would be cropped, not refused); a
        # weight of another size is left as saved, so load_state_dict reports the size mismatch
        if (isinstance(q, Tensor) and q.dim() in (2, 3) and self._layout_of(q) != self._layout_of(self.qweight)
                and tuple(q.shape) == self._shape_in(self._layout_of(q))):
            state_dict[key] = self._in_layout(q.to(self.qweight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _qweight_nk(self) -> Tensor:
        """The int8 weight as (N, K), whatever the layout (a copy from panels)."""
        return self._nk(self.qweight)

    def _int_mm(self, xq: Tensor) -> Tensor:
        """xq (M, K) int8 @ the weight^T -> (M, N) int32, exact (fastlm.linear.int_mm's paths)."""
        q = self.qweight
        layout = self._layout_of(q)
        if layout == "pairs" and cpu_features.int8_gemm_path() == "fastlm_avx2":
            return torch.ops.fastlm.int8_gemm_avx2_panels(xq, q, self.out_features)
        if layout != "nk":  # quads run the fused ops (_quads()) while the path is fastlm_vnni; here the path
            q = self._nk(q)  # changed since the layout was made: unpacked per call (slow)
        return int_mm(xq, q.t())

    def _quads(self) -> bool:
        """Whether the fused VNNI ops (GEMM and epilogue in one, int8_gemm_vnni.cpp) run this layer:
        its weight is in quads and the path is still fastlm_vnni."""
        return self.qweight.dtype == torch.uint8 and cpu_features.int8_gemm_path() == "fastlm_vnni"

    def dequantized(self) -> Tensor:
        """The (N, K) float32 weight the layer computes with: q * scale, and the float32 columns
        of the outlier channels."""
        w = self._qweight_nk().float() * self.scale[:, None]
        if self.outliers is not None:
            w[:, self.outliers] = self.w_out.t()
        return w

    def fused_ready(self, x: Tensor) -> bool:
        return _cpu_kernel_ok(x)  # quantization and epilogue in fastlm._C

    def takes(self, xq: Int8Rows) -> bool:
        """Whether `xq` was quantized for this layer (the same outlier channels)."""
        return same_channels(xq.outliers, self.outliers)

    def _check(self, x: Tensor) -> None:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"Int8DynamicLinear: runs on CPU float32 activations, got {x.dtype} on {x.device}")

    def quantize_input(self, x: Tensor) -> Int8Rows:
        """x (..., K) float32 quantized per token for this layer (its outlier channels left out and
        returned in float32). Needs fastlm._C."""
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        q, s = torch.ops.fastlm.quantize_rows_int8(x2, self.outliers)
        xo = None if self.outliers is None else x2.index_select(1, self.outliers)  # (M, n_o)
        return Int8Rows(q, s, xo, self.outliers)

    def forward(self, x: Tensor, *, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
        _act_name(activation)
        self._check(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        r2 = None if residual is None else residual.reshape(-1, self.out_features)  # (M, N)
        if _ext.available():
            xq = self.quantize_input(x2)
            y = self.forward_int8(xq.q, xq.scale, activation=activation, residual=r2, xo=xq.xo)
            return y.view(*shape[:-1], self.out_features)
        xm = x2
        if self.outliers is not None:
            xm = x2.clone()
            xm[:, self.outliers] = 0
        xs = xm.abs().amax(dim=1, keepdim=True) / 127.0  # (M, 1) per-token scale
        xs = torch.where(xs > 0, xs, torch.ones_like(xs))
        xq = torch.round(xm / xs).clamp_(-127, 127).to(torch.int8)
        acc = self._int_mm(xq)  # (M, N) int32
        y = acc.float().mul_(xs).mul_(self.scale)
        if self.outliers is not None:
            y.add_(x2[:, self.outliers] @ self.w_out)  # (M, n_o) @ (n_o, N), float32
        if self.bias is not None:
            y.add_(self.bias)
        y = _epilogue(y, activation, r2)
        return y.view(*shape[:-1], self.out_features)

    def _outlier_args(self, xo: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if self.outliers is None:
            return None, None
        if xo is None:
            raise ValueError("Int8DynamicLinear: this layer has outlier channels: pass their float32 values (xo)")
        return xo, self.w_out

    def forward_int8(self, xq: Tensor, xs: Tensor, *, activation: str | None = None,
                     residual: Tensor | None = None, xo: Tensor | None = None) -> Tensor:
        """The GEMM and epilogue on activations already quantized per token: xq (M, K) int8,
        xs (M,) float32, xo (M, n_o) float32 the outlier channels (required when the layer has
        them) -> act(xq W^T * xs * scale + xo @ w_out + b) + residual, (M, N) float32. Needs fastlm._C."""
        x_out, w_out = self._outlier_args(xo)
        if self._quads():
            return torch.ops.fastlm.int8_linear_vnni(xq, self.qweight, self.out_features, xs, self.scale, self.bias,
                                                     _act_name(activation), residual, x_out, w_out)
        acc = self._int_mm(xq)  # (M, N) int32
        torch.ops.fastlm.int8_linear_epilogue_(acc, xs, self.scale, self.bias, _act_name(activation), residual,
                                               x_out, w_out)
        return acc.view(torch.float32)  # the epilogue's result, written over acc

    def forward_to_int8(self, x: Tensor, *, activation: str | None = None, xq: Int8Rows | None = None,
                        outliers: Tensor | None = None) -> Int8Rows:
        """act(x W^T + b) quantized per token for the next int8 linear (whose outlier channels are
        `outliers`), without an fp32 copy in memory: x (..., K) -> Int8Rows (q (M, N) int8, scale
        (M,), xo (M, n_o) or None, outliers), M = x.numel() // K. `xq`: x already quantized for this
        layer (Int8Rows), read instead of quantizing x. Needs fastlm._C."""
        self._check(x)
        if xq is None or not self.takes(xq):
            xq = self.quantize_input(x)
        x_out, w_out = self._outlier_args(xq.xo)
        if self._quads():
            q, s, yo = torch.ops.fastlm.int8_linear_vnni_quant(xq.q, self.qweight, self.out_features, xq.scale,
                                                               self.scale, self.bias, _act_name(activation), x_out,
                                                               w_out, outliers)
            return Int8Rows(q, s, None if outliers is None else yo, outliers)
        acc = self._int_mm(xq.q)  # (M, N) int32
        q, s, yo = torch.ops.fastlm.int8_linear_epilogue_quant(acc, xq.scale, self.scale, self.bias,
                                                               _act_name(activation), x_out, w_out, outliers)
        return Int8Rows(q, s, None if outliers is None else yo, outliers)

    def forward_add_layer_norm(self, xq: Int8Rows, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                               eps: float, outliers: Tensor | None = None) -> tuple[Tensor, Int8Rows]:
        """h = LayerNorm(residual + (xq W^T * xs * scale + xo @ w_out + b)) with (ln_weight, ln_bias,
        eps), and h quantized per token for the next int8 linear (whose outlier channels are
        `outliers`), in one pass over the rows (fastlm._C int8_linear_epilogue_ln_quant_: the
        arithmetic of int8_linear_epilogue, then add_layer_norm_ext, then quantize_rows_int8, bit
        for bit). xq: Int8Rows for this layer, residual (M, N) float32 -> (h (M, N) float32,
        Int8Rows of h). Needs fastlm._C."""
        x_out, w_out = self._outlier_args(xq.xo)
        if self._quads():
            h, hq, hs, ho = torch.ops.fastlm.int8_linear_vnni_ln_quant(
                xq.q, self.qweight, self.out_features, xq.scale, self.scale, self.bias, residual, ln_weight, ln_bias,
                float(eps), x_out, w_out, outliers)
            return h, Int8Rows(hq, hs, None if outliers is None else ho, outliers)
        acc = self._int_mm(xq.q)  # (M, N) int32
        hq, hs, ho = torch.ops.fastlm.int8_linear_epilogue_ln_quant_(
            acc, xq.scale, self.scale, self.bias, residual, ln_weight, ln_bias, float(eps), x_out, w_out, outliers)
        return acc.view(torch.float32), Int8Rows(hq, hs, None if outliers is None else ho, outliers)  # h over acc


class Int8TiedEmbedding(nn.Module):
    """The token embedding of a tied model whose head is int8 (Int8Linear or Int8DynamicLinear): the
    lookup reads the head's int8
    rows (q[id] * scale[id]), so no full-precision copy of the tied weight is kept. It equals the
    embedding of transformers run on the dequantized (still tied) weights."""

    def __init__(self, head: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.head = [head]  # a plain list: the head stays registered once, as lm_head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        h = self.head[0]
        q = h.qweight
        if q.dim() == 3:  # panels (nb, ceil(K / g), 16 g): g = 1 (K, 16), 2 pair panels, 4 quads (of q + 128)
            nb, kg, width = q.shape
            g = width // PANEL
            rows = q.view(nb, kg, PANEL, g)[ids // PANEL, :, ids % PANEL]  # (..., kg, g)
            rows = rows.reshape(*rows.shape[:-2], kg * g)[..., : self.embedding_dim]  # (..., K)
            if q.dtype == torch.uint8:
                rows = (rows.to(torch.int16) - 128).to(torch.int8)
        else:
            rows = q[ids]  # (..., K) int8
        return (rows.float() * h.scale[ids].unsqueeze(-1)).to(self.dtype)
