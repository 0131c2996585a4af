"""Fused scale + mask + softmax over the last dim of a row-major view.

Rows up to 16k (fp16/bf16) or 8k (fp32) elements live in registers: one read, one write.
Longer rows take the online kernel: one pass for the running max and sum, one to write.
A bool mask keeps True, a float mask is added; masks broadcast through strides (stride 0),
never materialised. Rows with every entry masked give 0. Math in fp32, exp2 with log2(e)
folded into the scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import (
    AOT_CAPS,
    LOG2E,
    AOTConfig,
    Ptr,
    device_guard,
    register_aot,
    softmax_launch,
    softmax_launch_space,
    triton_dtype,
)


@triton.jit
def _row_offsets(row, R1, R2, s0, s1, s2):
    i2 = row % R2
    i1 = (row // R2) % R1
    i0 = row // (R1 * R2)
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _load_scaled(X, M, x_off, m_off, cols, n_cols, scale_log2, smn, MASK_KIND: tl.constexpr):
    """x * scale + mask in log2 units, -inf outside the row and where masked."""
    inb = cols < n_cols
    x = tl.load(X + x_off + cols, mask=inb, other=0.0).to(tl.float32) * scale_log2
    if MASK_KIND == 1:
        keep = tl.load(M + m_off + cols * smn, mask=inb, other=0)
        x = tl.where(keep != 0, x, float("-inf"))
    if MASK_KIND == 2:
        x = x + tl.load(M + m_off + cols * smn, mask=inb, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(inb, x, float("-inf"))


@triton.jit
def _softmax_one_pass(X, Y, M, scale_log2, n_cols, R1, R2, sx0, sx1, sx2, sm0, sm1, sm2, smn,
                      MASK_KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows on grid axis 0; 64-bit offsets
    x_off = _row_offsets(row, R1, R2, sx0, sx1, sx2)
    m_off = _row_offsets(row, R1, R2, sm0, sm1, sm2)
    cols = tl.arange(0, BLOCK)
    x = _load_scaled(X, M, x_off, m_off, cols, n_cols, scale_log2, smn, MASK_KIND)
    m = tl.max(x, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.math.exp2(x - m)
    s = tl.sum(e, 0)
    s = tl.where(s == 0.0, 1.0, s)  # fully masked row: 0, not NaN
    tl.store(Y + row * n_cols + cols, (e / s).to(Y.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _softmax_online(X, Y, M, scale_log2, n_cols, R1, R2, sx0, sx1, sx2, sm0, sm1, sm2, smn,
                    MASK_KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_off = _row_offsets(row, R1, R2, sx0, sx1, sx2)
    m_off = _row_offsets(row, R1, R2, sm0, sm1, sm2)
    m_run = tl.full([BLOCK], float("-inf"), dtype=tl.float32)  # per-lane running max and sum
    s_run = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = _load_scaled(X, M, x_off, m_off, start + tl.arange(0, BLOCK), n_cols, scale_log2, smn, MASK_KIND)
        m_new = tl.maximum(m_run, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.math.exp2(m_run - m_safe) + tl.math.exp2(x - m_safe)
        m_run = m_new
    m = tl.max(m_run, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_run * tl.math.exp2(m_run - m), 0)
    inv = 1.0 / tl.where(s == 0.0, 1.0, s)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = _load_scaled(X, M, x_off, m_off, cols, n_cols, scale_log2, smn, MASK_KIND)
        tl.store(Y + row * n_cols + cols, (tl.math.exp2(x - m) * inv).to(Y.dtype.element_ty), mask=cols < n_cols)


def _lead3(shape, strides):
    """Leading dims padded/collapsed to exactly 3 (sizes, strides); None if they cannot collapse."""
    sizes, st = list(shape), list(strides)
    while len(sizes) < 3:
        sizes.insert(0, 1)
        st.insert(0, 0)
    while len(sizes) > 3:  # merge dims 0 and 1 when they are uniformly strided
        if st[0] != st[1] * sizes[1]:
            return None
        sizes[0:2] = [sizes[0] * sizes[1]]
        st[0:2] = [st[1]]
    return sizes, st


def softmax(x: torch.Tensor, dim: int, scale: float, mask: torch.Tensor | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(x * scale + mask) along `dim` (validated by fastlm.ops). Returns a contiguous tensor;
    `out` (contiguous, x's shape with `dim` moved last) is written when given."""
    last = dim == x.dim() - 1
    xt = (x if last else x.movedim(dim, -1)).contiguous()
    n = xt.shape[-1]
    lead = _lead3(xt.shape[:-1], xt.stride()[:-1])
    kind, mt, sm, smn = 0, xt, [0, 0, 0], 0
    if mask is not None:
        kind = 1 if mask.dtype == torch.bool else 2
        mt = mask.expand(x.shape)
        mt = mt if last else mt.movedim(dim, -1)
        ml = _lead3(mt.shape[:-1], mt.stride()[:-1])
        if ml is None:
            mt = mt.contiguous()
            ml = _lead3(mt.shape[:-1], mt.stride()[:-1])
        sm, smn = ml[1], mt.stride(-1)
        if kind == 1:
            mt = mt.view(torch.uint8)
    y = torch.empty_like(xt) if out is None else out
    rows = xt.numel() // n
    which, launch = softmax_launch(n, xt.element_size())
    kernel = _softmax_one_pass if which == "one_pass" else _softmax_online
    (R0, R1, R2), (s0, s1, s2) = lead
    with device_guard(xt):
        kernel[(rows,)](xt, y, mt, float(scale) * LOG2E, n, R1, R2, s0, s1, s2, *sm, smn,
                        MASK_KIND=kind, **launch.kwargs())
    return y if last else y.movedim(-1, dim).contiguous()


@register_aot("softmax")
def aot_configs() -> list[AOTConfig]:
    """Each kernel and row-length bucket with each mask kind, for attention-score layouts:
    x (B, H, S, n) contiguous, the mask a (B, 1, 1, n) key mask broadcast by stride 0."""
    cfgs = []
    for i, (n, eb) in enumerate(softmax_launch_space()):
        which, launch = softmax_launch(n, eb)
        kernel = _softmax_one_pass if which == "one_pass" else _softmax_online
        dtype = torch.float16 if eb == 2 else torch.float32
        t = Ptr(triton_dtype(dtype))
        kind = i % 3
        H, S = 12, 77
        args = dict(X=t, Y=t, M=Ptr("u8") if kind == 1 else t, scale_log2=0.18, n_cols=n, R1=H, R2=S,
                    sx0=H * S * n, sx1=S * n, sx2=n, sm0=n if kind else 0, sm1=0, sm2=0, smn=1 if kind else 0)
        for cap in AOT_CAPS:
            cfgs.append(AOTConfig(f"softmax {which} n{n} {triton_dtype(dtype)} mask{kind} sm_{cap} {launch.blocks}",
                                  kernel, args, {"MASK_KIND": kind, **launch.blocks}, launch.num_warps,
                                  launch.num_stages, cap, dtype=triton_dtype(dtype)))
    return cfgs
