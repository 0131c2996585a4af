"""fastlm's attention as a transformers attention implementation ("fastlm").

Registered through transformers' AttentionInterface (the supported extension point, stable across
5.x while the attention modules' internals change) with sdpa's mask builder, so the mask arrives
as bool [B, 1, Q, K] or None. That mask is matched once per forward (the same tensor goes to every
layer) against fastlm's two shapes: a key padding mask, with or without end-aligned causality.
Anything else (attention weights requested, dropout in training, cross-attention, a head dim out of
range, a mask of another shape) runs transformers' own sdpa/eager code, with one warning per reason;
so does a call that autograd records (q, k or v requires grad in grad mode: the kernels have no
backward), without a warning (fastlm.integrations.common.records_grad logs it once).
"""

from __future__ import annotations

import logging
import warnings

import torch

from fastlm import ops
from fastlm.reference import causal_keep

log = logging.getLogger("fastlm")
NAME = "fastlm"
_warned: set[str] = set()
_plan_cache: dict = {"mask": None, "plan": None}


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastlm: falling back to transformers' attention: {reason}", stacklevel=3)


def _weights_requested(kw: dict) -> bool:
    if kw.get("output_attentions"):
        return True
    try:  # transformers 5 records attention weights through hooks when they are asked for
        from transformers.utils.output_capturing import _active_collector

        col = _active_collector.get()
        return bool(col) and "attentions" in col
    except Exception:
        return False


def mask_plan(mask: torch.Tensor | None, q_len: int, k_len: int, is_causal: bool):
    """(key_padding_mask or None, causal) reproducing `mask` on every query row that sees at
    least one key, or None when the mask has another shape."""
    if mask is None:
        return None, bool(is_causal and q_len > 1)
    if torch.compiler.is_compiling():
        # No data-dependent check inside a graph: trust the two shapes sdpa's mask builder makes
        # for BERT / GPT-2 when they are unambiguous (one query; or queries == keys, where end- and
        # top-left-aligned causality agree). Anything else runs transformers' sdpa.
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
            return None
        if q_len == 1:
            return mask[:, 0, 0, :], False
        if q_len == k_len:
            return mask[:, 0].any(dim=1), bool(is_causal)
        return None
    if mask is _plan_cache["mask"]:
        return _plan_cache["plan"]
    plan = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1:
        m = mask[:, 0]  # (B, Q, K)
        kpm = m.any(dim=1)  # keys visible to some query
        for causal in ((False, True) if q_len > 1 else (False,)):
            expect = kpm[:, None, :].expand_as(m)
            if causal:
                expect = expect & causal_keep(q_len, k_len, m.device)
            rows = expect.any(-1, keepdim=True)  # rows with nothing visible are padding: any output is fine
            if bool(((m == expect) | ~rows).all()):
                plan = (None if bool(kpm.all()) else kpm, causal)
                break
    _plan_cache.update(mask=mask, plan=plan)
    return plan


def fastlm_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kw):
    """transformers attention function: q, k, v [B, H, S, D] -> ([B, S, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    reason = None
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if grad and dropout == 0.0 and not _weights_requested(kw):
        # a backward may follow: transformers' sdpa (its gradients), not a kernel without backward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)
    if _weights_requested(kw):
        reason = "attention weights were requested (output_attentions=True)"
    elif dropout > 0.0:
        reason = "attention dropout is active (train mode)"
    elif getattr(module, "is_cross_attention", False):
        reason = "cross-attention"
    elif query.shape[-1] > 128 or key.shape[-1] != query.shape[-1]:
        reason = f"head dim {query.shape[-1]} (fastlm kernels take up to 128)"
    elif query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reason = f"dtype {query.dtype}"
    plan = None
    if reason is None:
        plan = mask_plan(attention_mask, query.shape[2], key.shape[2], getattr(module, "is_causal", False))
        if plan is None:
            reason = "an attention mask that is not padding (+ causal)"
    if reason is not None:
        warn_once(reason)
        if _weights_requested(kw):
            from transformers.models.bert.modeling_bert import eager_attention_forward

            if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds its mask
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min)
            return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kw)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)
    kpm, causal = plan
    out = ops.attention(query, key, value, causal=causal, key_padding_mask=kpm, scale=scaling)  # (B, H, S, D)
    return out.transpose(1, 2), None  # (B, S, H, D): contiguous, fastlm writes this layout


_registered = False


def register() -> None:
    """Add "fastlm" to transformers' attention and mask registries (new names only)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fastlm_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True
