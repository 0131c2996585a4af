"""fastlm.optimize for transformers DistilBERT: attention (AttentionInterface), and each
TransformerBlock's residual LayerNorms and FFN on fastlm's fused ops; the embedding LayerNorm."""

from __future__ import annotations

import types

from fastlm import ops
from fastlm.integrations.common import patch_layer_norm, records_grad, set_forward
from fastlm.models.common import activation_name


def _block_forward(self, hidden_states, attention_mask=None, **kwargs):
    """transformers' TransformerBlock.forward: sa_layer_norm(attn + h), then
    output_layer_norm(ffn + a), with the residual adds fused into the LayerNorms."""
    if self.training or records_grad(self, hidden_states):  # dropout / a backward: transformers' own code
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    a, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    ln = self.sa_layer_norm
    a = ops.layer_norm(a, ln.weight, ln.bias, ln.eps, residual=hidden_states)[0]  # LN(h + attn)
    lin1, lin2 = self.ffn.lin1, self.ffn.lin2
    if self._fastlm_act is None:
        f = self.ffn(a)
    else:
        f = ops.ffn(a, lin1.weight, lin1.bias, lin2.weight, lin2.bias, activation=self._fastlm_act)
    ln = self.output_layer_norm
    return ops.layer_norm(f, ln.weight, ln.bias, ln.eps, residual=a)[0]  # LN(a + ffn(a))


def patch(model, warn) -> None:
    base = model.base_model  # model.distilbert, or the model itself
    try:
        act = activation_name("DistilBERT", model.config.activation)
    except ValueError as e:
        act = None
        warn(f"DistilBERT FFN keeps transformers' code: {e}")
    for block in base.transformer.layer:
        block._fastlm_act = act
        set_forward(block, types.MethodType(_block_forward, block))
    patch_layer_norm(base.embeddings.LayerNorm)


def unpatch(model) -> None:
    for block in model.base_model.transformer.layer:
        block.__dict__.pop("_fastlm_act", None)
