"""Each op on torch's own fused operators, with fastlm's contract kept.

On CPU tensors fastlm runs, for each op, whichever is faster here: its C++ twin in fastlm._C or
these (measured per op at BERT-base B8 S128 and GPT-2 decode B1 shapes; see
fastlm.backend.CPU_FASTEST and `fastlm info`). They differ from fastlm.reference, the ground
truth, only in rounding: the reference spells the math out step by step in float32; these call
torch's fused kernels (F.scaled_dot_product_attention, torch.softmax, F.layer_norm, F.gelu,
F.linear). The contract is the same: rows with no visible key give 0 (not NaN), causal
attention with S_q < S_k is aligned to the end of the keys, strided views are read in place,
decode rows past a sequence's length never reach the output. Inputs are assumed valid
(fastlm.ops validates).
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import reference

# what each op calls, for `fastlm info` (describe() drops what this CPU does not run)
TORCH_OPS = {
    "attention": ("fastlm._C attention_decode (fp32, <= 16 queries), fastlm._C attention_blocked (fp32 / bf16, "
                  "no mask, AVX-512) or F.scaled_dot_product_attention"),
    "attention_varlen": "attention per sequence (as above)",
    "softmax": "torch.softmax",
    "decode_attention": ("fastlm._C attention_decode (fp32, <= 16K keys) or F.scaled_dot_product_attention "
                         "on the valid rows"),
    "bias_gelu": "F.gelu",
    "ffn": "F.linear + F.gelu + F.linear",
    "layer_norm": "F.layer_norm",
}


def _sdpa_zeroes_empty_rows() -> bool:
    """Whether this torch's SDPA gives 0 (not NaN) for a query that sees no key (torch >= 2.5 does)."""
    q = torch.ones(1, 1, 1, 8)
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 1, 1, dtype=torch.bool))
    return bool((out == 0).all())


SDPA_ZEROES_EMPTY_ROWS = _sdpa_zeroes_empty_rows()  # probed once at import, outside any trace


def _sdpa(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    if keep is not None and not SDPA_ZEROES_EMPTY_ROWS:
        out = out.masked_fill(~keep.any(-1, keepdim=True), 0.0)  # no visible key: 0, not NaN
    return out


# Up to this many queries x keys per head, fp32 CPU attention runs fastlm._C's attention_decode on
# the calling thread: torch's CPU SDPA sends every call through OpenMP (grain 1), and at decode
# and short-prompt sizes the thread hand-off costs more than the math (2-9 ms per call on a busy
# 2-core machine, GPT-2 small, 2 threads). Past it, SDPA's blocked kernel wins.
# Decode and short prompts only: at encoder sizes (BERT-base B8 S128: 128 queries per head) SDPA's
# blocked kernel is 2-3x faster than the per-row kernel even on one thread (measured 7.4 vs 23 ms).
SMALL_ATTENTION = 16 * 1024
SMALL_QUERIES = 16


def _small_attention_ok(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype = torch.float32) -> bool:
    from fastlm import _ext

    return (_ext.available() and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == dtype
            and k.shape[-1] == v.shape[-1] and q.shape[-2] <= SMALL_QUERIES
            and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION
            and k.shape[-2] > 0 and not torch.compiler.is_compiling())


@functools.cache
def _has_avx512() -> bool:
    """Whether fastlm._C's AVX-512 kernels may run: the CPU has AVX-512F and fastlm._C's one ISA
    decision (csrc/gemv.cpp, capped by FASTLM_CPU_ISA=avx2|portable) allows it."""
    from fastlm import _ext

    return _ext.available() and bool(torch.ops.fastlm.cpu_has_avx512())


def describe(op: str) -> str:
    """What `op` calls on this CPU, for `fastlm info`: TORCH_OPS without the kernels this CPU (or
    FASTLM_CPU_ISA) rules out."""
    if op == "attention":
        from fastlm import _ext

        parts = ["fastlm._C attention_decode (fp32, <= 16 queries)"] if _ext.available() else []
        if _has_avx512():
            parts.append("fastlm._C attention_blocked (fp32 / bf16, no mask, AVX-512)")
        return ", ".join(parts) + (" or " if parts else "") + "F.scaled_dot_product_attention"
    if op == "decode_attention":
        from fastlm import _ext

        if not _ext.available():
            return "F.scaled_dot_product_attention on the valid rows"
    return TORCH_OPS[op]


# Encoder-sized fp32 attention without a mask (BERT's unpadded batches) runs fastlm._C's
# attention_blocked where the CPU has AVX-512: at BERT-base B8 S128 1.4 ms per layer against 3.3-4.2
# ms for torch's CPU SDPA (measured 2026-11-29, 2 threads, AMD Zen 5; also ahead at S 64-512).
# Past BLOCKED_MAX_KEYS keys SDPA's flash kernel wins (S 2048: 72 vs 84 ms): SDPA there.
BLOCKED_MAX_KEYS = 512


# bf16 q / k / v (encoders in bfloat16) take attention_blocked too: vdpbf16ps on the bf16 rows where
# the CPU has AVX512_BF16, else fp32 math on converted rows; bf16 out (the bf16 accuracy contract:
# fp32 softmax and accumulation). Measured against torch's bf16 SDPA (flash) at BERT-base B8 S128,
# 2 threads, AMD Zen 4: see docs/design.md.
BLOCKED_DTYPES = (torch.float32, torch.bfloat16)


def _blocked_attention_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    D = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.dtype in BLOCKED_DTYPES and q.dim() == 4
            and D % 16 == 0 and D <= 256 and v.shape[-1] == D and 0 < k.shape[-2] <= BLOCKED_MAX_KEYS
            and q.shape[-2] > 0 and _has_avx512() and not torch.compiler.is_compiling())


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, key_padding_mask: Tensor | None = None,
              scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v for (B, H, S, D) tensors (any strides) -> (B, H, S_q, D_v)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if (key_padding_mask is None and q.dim() == 4 and (not causal or q.shape[-2] <= k.shape[-2])
            and _small_attention_ok(q, k, v)):
        return torch.ops.fastlm.attention_decode(q, k, v, float(scale), bool(causal))
    if (key_padding_mask is None and q.dim() == 4 and (not causal or q.shape[-2] <= k.shape[-2])
            and _small_attention_ok(q, k, v, torch.bfloat16)):
        # bf16 GPT-2 prompts: the fp32 kernel on fp32 copies (small: a few hundred KB), fp32 softmax
        # and accumulation, without an OpenMP region (SDPA's) between the pool-run GEMVs
        y = torch.ops.fastlm.attention_decode(q.float(), k.float(), v.float(), float(scale), bool(causal))
        return y.to(torch.bfloat16)
    if key_padding_mask is None and not causal and _blocked_attention_ok(q, k, v):
        return torch.ops.fastlm.attention_blocked(q, k, v, float(scale))
    s_q, s_k = q.shape[-2], k.shape[-2]
    if causal and key_padding_mask is None and s_q == s_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    keep = reference.causal_keep(s_q, s_k, q.device) if causal else None  # (S_q, S_k), end-aligned
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]  # (B, 1, 1, S_k)
        keep = kpm if keep is None else keep & kpm  # (B, 1, S_q, S_k)
    return _sdpa(q, k, v, keep, scale)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool = False,
                     scale: float | None = None) -> Tensor:
    """Packed sequences q, k, v (T, H, D); sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)  # (T, H, D_v)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D) views
        out[start:end] = attention(qi, ki, vi, causal, None, scale)[0].transpose(0, 1)
    return out


def softmax(x: Tensor, dim: int = -1, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """softmax(x * scale + mask) along `dim` in float32 (bool mask keeps True; float mask is
    added); rows with every entry masked (or -inf) give 0. CPU tensors: the check for such rows
    reads the output on the host, which costs no device sync there; under torch.compile the
    (traceable) reference runs instead."""
    if torch.compiler.is_compiling():
        return reference.softmax(x, dim, scale, mask)
    s = x if scale == 1.0 else x * scale
    if mask is not None:
        s = torch.where(mask, s, float("-inf")) if mask.dtype == torch.bool else s + mask
    out = torch.softmax(s, dim, dtype=torch.float32) if x.dtype != torch.float32 else torch.softmax(s, dim)
    if bool(out.sum().isnan()):  # rows with no finite entry (or NaN inputs) make NaN; outputs lie in [0, 1]
        dead = ~torch.isfinite(s).any(dim, keepdim=True)
        out = out.masked_fill(dead, 0.0)
    return out.to(x.dtype)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     scale: float | None = None) -> Tensor:
    """q (B, H, 1, D) against the first cache_seqlens[b] rows of the caches (B, H, S_max, D).
    Each sequence reads only its valid rows (views, no copy), so rows past a length (an unfilled
    cache may hold NaN / Inf) never reach the output; a length of 0 gives 0. CPU tensors: the
    lengths are read on the host (no device sync there); under torch.compile the (traceable)
    reference runs instead."""
    if torch.compiler.is_compiling():
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lens = cache_seqlens.tolist()
    B = q.shape[0]
    if min(lens) == max(lens) > 0:  # one length for all (decode of an unpadded batch): one call
        n = lens[0]
        k, v = k_cache[:, :, :n], v_cache[:, :, :n]  # (B, H, n, D) views
        if _small_attention_ok(q, k, v):
            return torch.ops.fastlm.attention_decode(q, k, v, float(scale), False)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = torch.zeros_like(q)  # (B, H, 1, D); length 0 stays 0
    for b in range(B):
        n = lens[b]
        if n > 0:
            out[b] = F.scaled_dot_product_attention(q[b], k_cache[b, :, :n], v_cache[b, :, :n], scale=scale)
    return out


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    if x.dtype == torch.float32:
        return F.gelu(x + bias, approximate=approximate)
    return reference.bias_gelu(x, bias, approximate)  # low precision: float32 math, as the reference


def ffn(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str = "gelu",
        residual: Tensor | None = None) -> Tensor:
    """linear(gelu(linear(x, w1, b1)), w2, b2) (+ residual), weights in nn.Linear layout."""
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    h = F.linear(x, w1, b1)
    h = F.gelu(h, approximate=approximate) if x.dtype == torch.float32 else reference.bias_gelu(
        h, torch.zeros((), dtype=h.dtype, device=h.device), approximate)
    y = F.linear(h, w2, b2)
    return y if residual is None else y.add_(residual)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Tensor | None = None):
    """LayerNorm over the last dim (float32 statistics); with `residual`, of x + residual, and
    returns (normed, x + residual)."""
    if x.dtype != torch.float32:
        return reference.layer_norm(x, weight, bias, eps, residual)
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (x.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)
