"""nn.Module drop-ins on fastlm's ops, for people building their own models.

FusedAttention (fused QKV projection + fastlm attention + output projection), FusedFFN
(linear, GELU, linear with the epilogues fused on GPU) and FusedLayerNorm (optionally after a
residual add). Each has `from_hf(module)` for the matching transformers BERT / GPT-2 module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastlm import ops

# transformers' activation modules -> fastlm.ops.ffn's activation names
HF_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
                  "PytorchGELUTanh": "gelu_tanh"}


@torch.no_grad()
def _load(linear: nn.Linear, weight: Tensor, bias: Tensor) -> None:
    linear.weight.copy_(weight)
    linear.bias.copy_(bias)


def _hf_activation(fn) -> str:
    name = type(fn).__name__
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"activation {name} is not supported (supported: {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


class FusedLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim (fp32 statistics); forward(x, residual) returns
    (LN(x + residual), x + residual) in one pass."""

    def forward(self, x: Tensor, residual: Tensor | None = None):
        if residual is None:
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)

    @classmethod
    def from_hf(cls, ln: nn.LayerNorm) -> FusedLayerNorm:
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1 or ln.bias is None:
            raise TypeError(f"FusedLayerNorm.from_hf: needs a 1-D affine nn.LayerNorm with bias, got {ln!r}")
        m = cls(ln.normalized_shape[0], eps=ln.eps, device=ln.weight.device, dtype=ln.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(ln.weight)
            m.bias.copy_(ln.bias)
        return m


class FusedFFN(nn.Module):
    """fc2(act(fc1(x))) (+ residual) with fc1 (d_ff, d_model) and fc2 (d_model, d_ff) in nn.Linear layout."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", device=None, dtype=None):
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"FusedFFN: activation must be one of {', '.join(ops.ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(d_model, d_ff, device=device, dtype=dtype)
        self.fc2 = nn.Linear(d_ff, d_model, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return ops.ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                       activation=self.activation, residual=residual)

    def extra_repr(self) -> str:
        return f"d_model={self.fc1.in_features}, d_ff={self.fc1.out_features}, activation={self.activation}"

    @classmethod
    def from_hf(cls, module: nn.Module) -> FusedFFN:
        """From a transformers GPT2MLP (Conv1D weights, transposed here) or a BertLayer
        (intermediate.dense, output.dense; its LayerNorm stays outside)."""
        name = type(module).__name__
        if name == "GPT2MLP":
            w1, b1 = module.c_fc.weight.t(), module.c_fc.bias
            w2, b2 = module.c_proj.weight.t(), module.c_proj.bias
            act = _hf_activation(module.act)
        elif name == "BertLayer":
            w1, b1 = module.intermediate.dense.weight, module.intermediate.dense.bias
            w2, b2 = module.output.dense.weight, module.output.dense.bias
            act = _hf_activation(module.intermediate.intermediate_act_fn)
        else:
            raise TypeError(f"FusedFFN.from_hf: needs a GPT2MLP or a BertLayer, got {name}")
        m = cls(w1.shape[1], w1.shape[0], act, device=w1.device, dtype=w1.dtype)
        _load(m.fc1, w1, b1)
        _load(m.fc2, w2, b2)
        return m


class FusedAttention(nn.Module):
    """Multi-head self-attention: qkv = x W_qkv^T (fused), fastlm attention, out projection.
    forward(x (B, S, C), key_padding_mask (B, S) bool, True = keep) -> (B, S, C)."""

    def __init__(self, d_model: int, n_head: int, causal: bool = False, scale: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"FusedAttention: d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.head_dim, self.causal = n_head, d_model // n_head, causal
        self.scale = scale if scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device, dtype=dtype)
        self.out = nn.Linear(d_model, d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        B, S, C = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.n_head, self.head_dim)  # (B, S, 3, H, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, H, S, D), strided views
        y = ops.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(B, S, C))  # (B, S, C)

    def extra_repr(self) -> str:
        return f"d_model={self.qkv.in_features}, n_head={self.n_head}, head_dim={self.head_dim}, causal={self.causal}"

    @classmethod
    def from_hf(cls, module: nn.Module) -> FusedAttention:
        """From a transformers GPT2Attention (causal) or BertAttention (its self + output.dense;
        the output LayerNorm stays outside)."""
        name = type(module).__name__
        if name == "GPT2Attention":
            if module.is_cross_attention:
                raise TypeError("FusedAttention.from_hf: cross-attention is not supported")
            wq, bq = module.c_attn.weight.t(), module.c_attn.bias
            wo, bo = module.c_proj.weight.t(), module.c_proj.bias
            n_head, causal, scale = module.num_heads, True, module.scaling
        elif name == "BertAttention":
            s = module.self
            wq = torch.cat([s.query.weight, s.key.weight, s.value.weight])
            bq = torch.cat([s.query.bias, s.key.bias, s.value.bias])
            wo, bo = module.output.dense.weight, module.output.dense.bias
            n_head, causal, scale = s.num_attention_heads, False, s.scaling
        else:
            raise TypeError(f"FusedAttention.from_hf: needs a GPT2Attention or a BertAttention, got {name}")
        m = cls(wq.shape[1], n_head, causal, scale, device=wq.device, dtype=wq.dtype)
        _load(m.qkv, wq, bq)
        _load(m.out, wo, bo)
        return m
