"""fastlm.optimize for transformers BERT, RoBERTa, XLM-RoBERTa and CamemBERT (the same layer
code): attention (AttentionInterface), the FFN with its residual LayerNorm, the attention-output
LayerNorm and the embedding LayerNorm. On a right-padded batch the encoder removes the padding
once and runs every layer on the real tokens (varlen attention), as fastlm's own BertModel does:
padded positions of last_hidden_state come back as 0 (transformers fills them with values no
real token or [CLS] pooler reads)."""

from __future__ import annotations

import types

import torch

from fastlm import ops
from fastlm.integrations import attention
from fastlm.integrations.common import patch_layer_norm, records_grad, set_forward
from fastlm.models.common import activation_name


def _ffn_chunk(self, attention_output):
    if self.training or records_grad(self, attention_output):
        return type(self).feed_forward_chunk(self, attention_output)
    inter, out = self.intermediate, self.output
    h = ops.ffn(attention_output, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias,
                activation=self._fastlm_act)
    ln = out.LayerNorm
    return ops.layer_norm(h, ln.weight, ln.bias, ln.eps, residual=attention_output)[0]  # LN(a + ffn(a))


def _self_output_forward(self, hidden_states, input_tensor):
    if self.training or records_grad(self, hidden_states, input_tensor):
        return type(self).forward(self, hidden_states, input_tensor)
    ln = self.LayerNorm
    return ops.layer_norm(self.dense(hidden_states), ln.weight, ln.bias, ln.eps, residual=input_tensor)[0]


def _collecting() -> bool:
    """Whether transformers 5 is recording per-layer outputs through hooks (output_hidden_states /
    output_attentions): those hooks need every layer's own call, so the padded path runs."""
    try:
        from transformers.utils.output_capturing import _active_collector

        return bool(_active_collector.get())
    except Exception:  # noqa: BLE001 - older transformers: nothing to record
        return False


def _encoder_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, cache=None, use_cache=None, **kwargs):
    """BertEncoder.forward that unpads a right-padded batch once (see the module docstring); any
    other call (training, autograd recording, cross-attention, a cache, recorded outputs, left padding, a mask that
    is not padding, torch.compile) runs transformers' code."""
    B, S, C = hidden_states.shape
    plan = None
    if not (self.training or records_grad(self, hidden_states) or encoder_hidden_states is not None
            or cache is not None or use_cache or any(kwargs.values()) or torch.compiler.is_compiling()
            or _collecting()):
        plan = attention.mask_plan(attention_mask, S, S, False)
    keep = None if plan is None or plan[1] else plan[0]  # (B, S) bool key padding mask
    if keep is None or not bool(keep[:, 0].all()) or not bool(keep.any()):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, cache=cache,
                                  use_cache=use_cache, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    from fastlm.models.bert import _unpad

    idx, _, cu, max_len, _ = _unpad(keep)  # no ghosts: every row starts with a real token
    T = idx.numel()
    x = hidden_states.reshape(B * S, C).index_select(0, idx)  # (T, C)
    for layer in self.layer:
        att = layer.attention.self
        H, D = att.num_attention_heads, att.attention_head_size
        q, k, v = (lin(x).view(T, H, D) for lin in (att.query, att.key, att.value))  # 3 x (T, H, D)
        y = ops.attention_varlen_checked(q, k, v, cu, max_len, False, att.scaling).reshape(T, C)  # (T, C)
        a = layer.attention.output(y, x)  # (T, C): LN(x + dense(y))
        x = layer.feed_forward_chunk(a)  # (T, C): LN(a + ffn(a))
    out = x.new_zeros(B * S, C).index_copy_(0, idx, x).view(B, S, C)  # (B, S, C)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def patch(model, warn) -> None:
    base = model.base_model  # model.bert / model.roberta, or the model itself
    try:
        act = activation_name("BERT", model.config.hidden_act)
    except ValueError as e:
        act = None
        warn(f"BERT FFN keeps transformers' code: {e}")
    for layer in base.encoder.layer:
        quantized = not hasattr(layer.intermediate.dense, "weight")  # int8 (fastlm.quantize)
        if act is not None and not quantized:
            layer._fastlm_act = act
            layer.__dict__["feed_forward_chunk"] = types.MethodType(_ffn_chunk, layer)
        set_forward(layer.attention.output, types.MethodType(_self_output_forward, layer.attention.output))
    patch_layer_norm(base.embeddings.LayerNorm)
    if model.config._attn_implementation == attention.NAME and not getattr(model.config, "is_decoder", False):
        set_forward(base.encoder, types.MethodType(_encoder_forward, base.encoder))


def unpatch(model) -> None:
    base = model.base_model  # model.bert / model.roberta, or the model itself
    for layer in base.encoder.layer:
        layer.__dict__.pop("feed_forward_chunk", None)
        layer.__dict__.pop("_fastlm_act", None)
