"""fastlm.optimize for transformers GPT-2: attention (AttentionInterface), MLP and LayerNorms.
Only this model instance changes: per-instance forwards and non-persistent buffers."""

from __future__ import annotations

import types

from fastlm import ops
from fastlm.integrations.common import patch_layer_norm, records_grad, set_forward
from fastlm.models.common import activation_name


def _mlp_forward(self, hidden_states):
    if self.training or records_grad(self, hidden_states):  # dropout / a backward: transformers' own code
        return type(self).forward(self, hidden_states)
    return ops.ffn(hidden_states, self._fastlm_w1, self.c_fc.bias, self._fastlm_w2, self.c_proj.bias,
                   activation=self._fastlm_act)


def patch(model, warn) -> None:
    base = model.base_model  # model.transformer, or the model itself
    cfg = model.config
    try:
        act = activation_name("GPT2", cfg.activation_function)
    except ValueError as e:
        act = None
        warn(f"GPT-2 MLP keeps transformers' code: {e}")
    for block in base.h:
        mlp = block.mlp
        quantized = not hasattr(mlp.c_fc, "weight")  # int8 (fastlm.quantize): transformers' MLP calls it
        if act is not None and not quantized:
            # Conv1D keeps [in, out]. On CPU its transpose view is already the layout the CPU
            # GEMMs want (no copy); the GPU's GEMV kernels stream [out, in] rows, so there each
            # weight gets one transposed copy. Non-persistent: state_dict and save_pretrained
            # are unchanged.
            for name, conv in (("_fastlm_w1", mlp.c_fc), ("_fastlm_w2", mlp.c_proj)):
                w = conv.weight.detach().t()
                mlp.register_buffer(name, w.contiguous() if w.is_cuda else w, persistent=False)
            mlp._fastlm_act = act
            set_forward(mlp, types.MethodType(_mlp_forward, mlp))
        for ln in (block.ln_1, block.ln_2):
            patch_layer_norm(ln)
    patch_layer_norm(base.ln_f)


def unpatch(model) -> None:
    base = model.base_model  # model.transformer, or the model itself
    for block in base.h:
        for name in ("_fastlm_w1", "_fastlm_w2"):
            block.mlp._buffers.pop(name, None)
        block.mlp.__dict__.pop("_fastlm_act", None)
