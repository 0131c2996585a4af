"""fastlm.optimize for transformers BERT, RoBERTa, XLM-RoBERTa and CamemBERT (the same layer
code): attention (AttentionInterface), the FFN with its residual LayerNorm, the attention-output
LayerNorm and the embedding LayerNorm."""

from __future__ import annotations

import types

from fastlm import ops
from fastlm.integrations.common import patch_layer_norm, set_forward
from fastlm.models.common import activation_name


def _ffn_chunk(self, attention_output):
    if self.training:
        return type(self).feed_forward_chunk(self, attention_output)
    inter, out = self.intermediate, self.output
    h = ops.ffn(attention_output, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias,
                activation=self._fastlm_act)
    ln = out.LayerNorm
    return ops.layer_norm(h, ln.weight, ln.bias, ln.eps, residual=attention_output)[0]  # LN(a + ffn(a))


def _self_output_forward(self, hidden_states, input_tensor):
    if self.training:
        return type(self).forward(self, hidden_states, input_tensor)
    ln = self.LayerNorm
    return ops.layer_norm(self.dense(hidden_states), ln.weight, ln.bias, ln.eps, residual=input_tensor)[0]


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


def unpatch(model) -> None:
    base = model.base_model  # model.bert / model.roberta, or the model itself
    for layer in base.encoder.layer:
        layer.__dict__.pop("feed_forward_chunk", None)
        layer.__dict__.pop("_fastlm_act", None)
