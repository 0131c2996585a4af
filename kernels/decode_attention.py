"""Flash-decoding: one query token per sequence against a static KV cache.

Pass 1 splits each sequence's valid cache rows [0, cache_seqlens[b]) into `num_splits` chunks;
a program per (batch*head, split) streams its chunk in BLOCK_N rows and writes a partial
(max, sum, weighted value) in fp32. Pass 2 combines the splits. The split count depends only
on the cache capacity and batch*heads, so shapes stay static for CUDA graphs; programs whose
chunk lies past a sequence's length exit at once, so work follows the real lengths.
A query against an empty cache (length 0) gives 0. No tl.dot: with one query row the
product is a broadcast multiply and a row reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import (
    AOT_CAPS,
    LOG2E,
    AOTConfig,
    Launch,
    Ptr,
    decode_launch,
    decode_launch_space,
    device_guard,
    next_pow2,
    num_sms,
    register_aot,
    triton_dtype,
)

COMBINE = Launch({}, 4, 1)


@triton.jit
def _decode_split(Q, K, V, SEQLENS, PART_O, PART_ML, qk_scale,
                  stride_qb, stride_qh, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  H, head_dim, chunk, num_splits,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # batch*heads on axis 0; 64-bit offsets from here
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    seqlen = tl.load(SEQLENS + b)
    start = split * chunk
    end = tl.minimum(start + chunk, seqlen)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * qk_scale  # log2 units
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        valid = rows < end
        row0 = tl.cast(n0, tl.int64)  # 64-bit row offset, small in-tile offsets
        k = tl.load(k_base + row0 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(v_base + row0 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    part = bh * num_splits + split  # int64
    tl.store(PART_O + part * BLOCK_D + offs_d, acc)
    tl.store(PART_ML + part * 2, m_i)  # -inf for an empty chunk
    tl.store(PART_ML + part * 2 + 1, l_i)


@triton.jit
def _decode_combine(PART_O, PART_ML, Out, stride_ob, stride_oh, stride_od, H, head_dim, num_splits,
                    SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # batch*heads on axis 0; 64-bit offsets from here
    b = bh // H
    h = bh % H
    sp = tl.arange(0, SPLITS_P2)
    ok = sp < num_splits
    m = tl.load(PART_ML + (bh * num_splits + sp) * 2, mask=ok, other=float("-inf"))
    lse = tl.load(PART_ML + (bh * num_splits + sp) * 2 + 1, mask=ok, other=0.0)  # each split's sum
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_safe))  # weight of each split
    denom = tl.sum(w * lse, 0)
    offs_d = tl.arange(0, BLOCK_D)
    o = tl.load(PART_O + (bh * num_splits + sp)[:, None] * BLOCK_D + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)  # empty cache: 0
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < head_dim)


def plan(s_max: int, batch_heads: int, device: torch.device, num_splits: int | None = None):
    """(num_splits, chunk, launch) for a cache capacity: depends only on static shapes."""
    launch = decode_launch()
    bn = launch.blocks["BLOCK_N"]
    max_splits = triton.cdiv(s_max, bn)
    if num_splits is None:
        # enough programs for ~2 waves over the SMs, each with at least a few BLOCK_N rows
        num_splits = triton.cdiv(2 * num_sms(device), batch_heads)
        num_splits = min(num_splits, triton.cdiv(s_max, 4 * bn), 64)
    num_splits = max(1, min(num_splits, max_splits))
    chunk = triton.cdiv(triton.cdiv(s_max, num_splits), bn) * bn
    return triton.cdiv(s_max, chunk), chunk, launch


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale: float, num_splits: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, 1, D); caches (B, H, S_max, D) any strides; cache_seqlens int32 (B,). Returns (B, H, 1, D)."""
    B, H, _, D = q.shape
    s_max = k_cache.shape[2]
    splits, chunk, launch = plan(s_max, B * H, q.device, num_splits)
    block_d = max(16, next_pow2(D))
    part_o = torch.empty(B * H * splits, block_d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(B * H * splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    split_grid, combine_grid = decode_grids(B * H, splits)
    with device_guard(q):
        _decode_split[split_grid](q, k_cache, v_cache, cache_seqlens, part_o, part_ml, scale * LOG2E,
                                  q.stride(0), q.stride(1), q.stride(3), *k_cache.stride(), *v_cache.stride(),
                                  H, D, chunk, splits, BLOCK_D=block_d, **launch.kwargs())
        _decode_combine[combine_grid](part_o, part_ml, out, out.stride(0), out.stride(1), out.stride(3), H, D,
                                      splits, SPLITS_P2=max(2, next_pow2(splits)), BLOCK_D=block_d,
                                      **COMBINE.kwargs())
    return out


def decode_grids(batch_heads: int, splits: int) -> tuple[tuple[int, int], tuple[int]]:
    """Split pass (batch*heads on axis 0, splits <= 64 on axis 1) and combine pass (batch*heads)."""
    return (batch_heads, splits), (batch_heads,)


@register_aot("decode_attention")
def aot_configs() -> list[AOTConfig]:
    """The split pass per head dim and dtype, and the combine pass per split bucket, for the
    static cache's layout (B, H, S_max, D) contiguous and q a (B, H, 1, D) view of a fused QKV
    projection (B, 1, 3, H, D)."""
    cfgs = []
    H, S_max = 12, 1024
    for cap in AOT_CAPS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            t = Ptr(triton_dtype(dtype))
            for D in (32, 64, 128):
                launch = decode_launch()
                args = dict(Q=t, K=t, V=t, SEQLENS=Ptr("i32"), PART_O=Ptr("fp32"), PART_ML=Ptr("fp32"),
                            qk_scale=0.125, stride_qb=3 * H * D, stride_qh=D, stride_qd=1,
                            H=H, head_dim=D, chunk=256, num_splits=4)
                for n in "kv":
                    args.update({f"stride_{n}b": H * S_max * D, f"stride_{n}h": S_max * D, f"stride_{n}n": D,
                                 f"stride_{n}d": 1})
                cfgs.append(AOTConfig(f"decode_split D{D} {triton_dtype(dtype)} sm_{cap} {launch.blocks}",
                                      _decode_split, args, {**launch.blocks, "BLOCK_D": D}, launch.num_warps,
                                      launch.num_stages, cap, dtype=triton_dtype(dtype)))
            for sp in decode_launch_space():
                args = dict(PART_O=Ptr("fp32"), PART_ML=Ptr("fp32"), Out=t, stride_ob=H * 64, stride_oh=64,
                            stride_od=1, H=H, head_dim=64, num_splits=sp - 1)
                cfgs.append(AOTConfig(f"decode_combine splits<={sp} {triton_dtype(dtype)} sm_{cap}", _decode_combine,
                                      args, {"SPLITS_P2": sp, "BLOCK_D": 64}, COMBINE.num_warps,
                                      COMBINE.num_stages, cap, dtype=triton_dtype(dtype)))
    return cfgs
