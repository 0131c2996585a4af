"""Fused attention forward (FlashAttention-2 style) for padded and packed (varlen) batches.

A program holds a BLOCK_M tile of queries on chip and streams K/V in BLOCK_N tiles with an
online softmax in exp2 (the scale folded into log2 units); the S x S matrix never exists.
Causal attention aligns the queries to the end of the keys (chunked prefill); key blocks that
every query row sees run without masks, and only the diagonal band pays for them. Rows with no
visible key give 0. q, k, v may be strided views (a fused QKV projection is read in place), and
the output is written in (B, S, H, D) memory so the out-projection reads it without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import (
    LOG2E,
    AOTConfig,
    Launch,
    Ptr,
    attention_grid,
    attention_launch,
    attention_launch_space,
    capability,
    device_guard,
    interpreting,
    next_pow2,
    register_aot,
    triton_dtype,
)


@triton.jit
def _attn_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_n, offs_d, mask_d,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seqlen_k, causal_shift, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, EVEN_D: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    cols = start_n + offs_n
    row0 = tl.cast(start_n, tl.int64)  # the block's first key row: 64-bit row offset, small in-tile offsets
    kt_ptrs = k_base + row0 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T tile
    v_ptrs = v_base + row0 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (N, D)
    if MASKED:
        kt = tl.load(kt_ptrs, mask=(cols[None, :] < seqlen_k) & mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & mask_d[None, :], other=0.0)
    elif EVEN_D:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    qk = qk * qk_scale  # log2 units
    if MASKED:
        valid = cols[None, :] < seqlen_k
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)
        qk = tl.where(valid, qk, float("-inf"))
    if HAS_KPM:
        keep = tl.load(kpm_base + cols * stride_mn, mask=cols < seqlen_k, other=0)
        qk = tl.where(keep[None, :] != 0, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays 0
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, Out, KPM, CU_SEQLENS, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_mb, stride_mn,
              H, seqlen_q, seqlen_k, head_dim,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # grid: (batch*heads on axis 0, up to 2**31 - 1; query blocks on axis 1, <= 65,535)
    off_hb = tl.program_id(0).to(tl.int64)  # 64-bit from here: off_h * stride_qh etc. may pass 2**31
    start_m = tl.program_id(1)
    if CAUSAL:  # heaviest query blocks (most keys) first, so the tail of the grid is short work
        start_m = tl.num_programs(1) - 1 - start_m
    off_b = off_hb // H
    off_h = off_hb % H
    if IS_VARLEN:  # packed tokens: (T, H, D), sequence off_b is rows cu[b]:cu[b+1]
        seq_start = tl.load(CU_SEQLENS + off_b).to(tl.int64)
        seqlen_q = (tl.load(CU_SEQLENS + off_b + 1) - tl.load(CU_SEQLENS + off_b)).to(tl.int32)
        seqlen_k = seqlen_q
        q_base = Q + seq_start * stride_qm + off_h * stride_qh
        k_base = K + seq_start * stride_kn + off_h * stride_kh
        v_base = V + seq_start * stride_vn + off_h * stride_vh
        o_base = Out + seq_start * stride_om + off_h * stride_oh
    else:
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        o_base = Out + off_b * stride_ob + off_h * stride_oh
    kpm_base = KPM + off_b * stride_mb

    if start_m * BLOCK_M < seqlen_q:  # varlen: blocks past a short sequence do nothing
        m0 = start_m.to(tl.int64) * BLOCK_M  # the block's first query row, 64-bit
        q_base += m0 * stride_qm
        o_base += m0 * stride_om
        offs_mt = tl.arange(0, BLOCK_M)  # rows within the tile
        offs_m = start_m * BLOCK_M + offs_mt
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < head_dim
        q = tl.load(q_base + offs_mt[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < seqlen_q) & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        causal_shift = seqlen_k - seqlen_q  # query i sits at key position i + shift
        if CAUSAL:
            # keys [0, n_full) are visible to every row of this block: no mask there
            n_full = tl.minimum(tl.maximum(start_m * BLOCK_M + causal_shift + 1, 0), seqlen_k)
            n_full = (n_full // BLOCK_N) * BLOCK_N
            n_end = tl.minimum(tl.maximum((start_m + 1) * BLOCK_M + causal_shift, 0), seqlen_k)
        else:
            n_full = (seqlen_k // BLOCK_N) * BLOCK_N
            n_end = seqlen_k
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_n,
                                        offs_d, mask_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                                        seqlen_k, causal_shift, qk_scale, False, CAUSAL, HAS_KPM, EVEN_D,
                                        UPCAST, IEEE)
        for start_n in range(n_full, n_end, BLOCK_N):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_n,
                                        offs_d, mask_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                                        seqlen_k, causal_shift, qk_scale, True, CAUSAL, HAS_KPM, EVEN_D,
                                        UPCAST, IEEE)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # no visible key: the row is 0
        out = acc / l_safe[:, None]
        tl.store(o_base + offs_mt[:, None] * stride_om + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & mask_d[None, :])


def empty_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, S_q, D_v) view of a (B, S_q, H, D_v) buffer: out.transpose(1, 2).reshape(B, S, H*D)
    is then free for the out-projection."""
    B, H, S, _ = q.shape
    return torch.empty(B, S, H, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)


def _flags(q: torch.Tensor, D: int) -> dict:
    return dict(
        BLOCK_D=max(16, next_pow2(D)),
        EVEN_D=max(16, next_pow2(D)) == D,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,  # the interpreter's bf16 dot is wrong
        IEEE=q.dtype == torch.float32,  # fp32 in, fp32-exact dots (no TF32)
    )


def attention(q, k, v, causal: bool, key_padding_mask: torch.Tensor | None, scale: float,
              launch: Launch | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v (B, H, S, D) any strides (inputs validated by fastlm.ops). Returns (B, H, S_q, D),
    written into `out` (any strides) when given (tests pass a poisoned one)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    flags = _flags(q, D)
    cfg = launch or attention_launch(flags["BLOCK_D"], Sq, causal, q.dtype, capability(q))
    out = empty_out(q, v) if out is None else out
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
        smb, smn = kpm.stride()
    else:
        kpm, smb, smn = out, 0, 0  # unused
    grid = attention_grid(B * H, Sq, cfg.blocks["BLOCK_M"])
    with device_guard(q):
        _attn_fwd[grid](q, k, v, out, kpm, out, scale * LOG2E,
                        *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn,
                        H, Sq, Sk, D, CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, IS_VARLEN=False,
                        **flags, **cfg.kwargs())
    return out


def attention_varlen(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, scale: float,
                     launch: Launch | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed q, k, v (T, H, D); sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]."""
    T, H, D = q.shape
    B = cu_seqlens.numel() - 1
    flags = _flags(q, D)
    cfg = launch or attention_launch(flags["BLOCK_D"], max_seqlen, causal, q.dtype, capability(q))
    out = torch.empty(T, H, v.shape[-1], dtype=q.dtype, device=q.device) if out is None else out
    grid = attention_grid(B * H, max_seqlen, cfg.blocks["BLOCK_M"])
    with device_guard(q):
        _attn_fwd[grid](q, k, v, out, out, cu_seqlens, scale * LOG2E,
                        0, q.stride(1), q.stride(0), q.stride(2),
                        0, k.stride(1), k.stride(0), k.stride(2),
                        0, v.stride(1), v.stride(0), v.stride(2),
                        0, out.stride(1), out.stride(0), out.stride(2), 0, 0,
                        H, max_seqlen, max_seqlen, D, CAUSAL=bool(causal), HAS_KPM=False, IS_VARLEN=True,
                        **flags, **cfg.kwargs())
    return out


@register_aot("attention")
def aot_configs() -> list[AOTConfig]:
    """Every launch configuration attention_launch can pick, with each feature flag that changes
    the code (causal, key padding mask, varlen, uneven head dim), for the layouts the models pass:
    q, k, v strided views of a fused QKV projection (B, S, 3, H, D) (packed: (T, 3, H, D)), the
    output in (B, S, H, D) memory, the mask (B, S): unit strides on D and the mask's S, the rest
    multiples of 16 wherever H*D is."""
    cfgs, seen = [], set()
    variants = ((False, True, False), (True, False, False), (True, False, True))
    for i, (D, s, _, dtype, cap) in enumerate(attention_launch_space()):
        causal, has_kpm, varlen = variants[i % 3]  # each variant meets every arch and dtype
        launch = attention_launch(D, s, causal, dtype, cap)
        even_d = D != 128  # exercise the masked-head-dim path on the largest tile
        hd = D if even_d else 96  # the real head dim behind the padded BLOCK_D
        H, S = 12, s + 3  # an odd sequence length: masked last blocks
        t = Ptr(triton_dtype(dtype))
        args = dict(Q=t, K=t, V=t, Out=t, KPM=Ptr("u8"), CU_SEQLENS=Ptr("i32"), qk_scale=0.125,
                    H=H, seqlen_q=S, seqlen_k=S, head_dim=hd)
        for n in "qkv":  # fused QKV view: (b, h, m, d) strides (S*3*H*D, D, 3*H*D, 1)
            args.update({f"stride_{n}b": 0 if varlen else S * 3 * H * hd, f"stride_{n}h": hd,
                         f"stride_{n}{'m' if n == 'q' else 'n'}": 3 * H * hd, f"stride_{n}d": 1})
        args.update(stride_ob=0 if varlen else S * H * hd, stride_oh=hd, stride_om=H * hd, stride_od=1,
                    stride_mb=S if has_kpm else 0, stride_mn=1 if has_kpm else 0)
        ce = dict(CAUSAL=causal, HAS_KPM=has_kpm, IS_VARLEN=varlen, **launch.blocks, BLOCK_D=D,
                  EVEN_D=even_d, UPCAST=False, IEEE=dtype == torch.float32)
        name = (f"attention D{D} S{s} {'causal' if causal else 'full'}{' kpm' if has_kpm else ''}"
                f"{' varlen' if varlen else ''} {triton_dtype(dtype)} sm_{cap} {launch.blocks} w{launch.num_warps}"
                f" s{launch.num_stages}")
        if name not in seen:
            seen.add(name)
            cfgs.append(AOTConfig(name, _attn_fwd, args, ce, launch.num_warps, launch.num_stages, cap,
                                  uses_dot=True, dtype=triton_dtype(dtype)))
    return cfgs
