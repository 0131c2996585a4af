"""Pieces the models share: output records, input checks, init, the weight-map entry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlm import ops
from fastlm.linear import FastLinear, Int8DynamicLinear, Int8Rows
from fastlm.linear_cpu import CPULinear
from fastlm.models.outputs import (  # noqa: F401  (re-exported: the models import them from here)
    BaseModelOutput,
    CausalLMOutput,
    LogitsOutput,
    ModelOutput,
    QuestionAnsweringModelOutput,
)


@dataclass(frozen=True)
class W:
    """One entry of a declarative weight map: fastlm's parameter `ours` is made from the
    transformers tensors `hf` by `how`:
      copy       the one tensor as is
      transpose  Conv1D [in, out] -> nn.Linear [out, in]  (GPT-2)
      cat        rows stacked in order: fused QKV from query, key, value  (BERT)
    """

    ours: str
    hf: tuple[str, ...]
    how: str = "copy"


class InputDTypeError(TypeError, ValueError):
    """A wrong dtype for a model input: a TypeError by Python's convention, and a ValueError as
    fastlm's bad-input contract promises for model arguments."""


def check_ids(model: str, input_ids, vocab_size: int, max_positions: int, attention_mask=None, *,
              token_type_ids=None, type_vocab_size: int | None = None, position_ids=None) -> None:
    """Checks the integer inputs of a model forward / generate; each error names the argument.

    input_ids (B, S) integer in [0, vocab_size), S <= max_positions; attention_mask (B, S) integer
    or bool with values 0/1; token_type_ids (B, S) integer in [0, type_vocab_size); position_ids
    (B, S) or (1, S) integer in [0, max_positions). A float where an integer belongs raises
    InputDTypeError (a TypeError and a ValueError); a bad shape, device or value ValueError.
    The value ranges are read on the host in one copy."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{model}: input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    _integer(model, "input_ids", input_ids, "token ids")
    if input_ids.dim() != 2:
        raise ValueError(f"{model}: input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"{model}: input_ids is empty (shape {tuple(input_ids.shape)})")
    if S > max_positions:
        raise ValueError(
            f"{model}: input_ids has {S} tokens per sequence, more than the model's {max_positions} positions"
        )
    # name -> (tensor, allowed first dims, [lo, hi), what the values are)
    args = {"input_ids": (input_ids, (B,), (0, vocab_size), "token ids")}
    if attention_mask is not None:
        args["attention_mask"] = (attention_mask, (B,), (0, 2), "1 = token, 0 = padding")
    if token_type_ids is not None:
        n_types = type_vocab_size if type_vocab_size is not None else 2**63 - 1
        args["token_type_ids"] = (token_type_ids, (B,), (0, n_types), "segment ids")
    if position_ids is not None:
        args["position_ids"] = (position_ids, (B, 1), (0, max_positions), "positions")
    for name, (t, firsts, _, what) in list(args.items())[1:]:
        if not isinstance(t, Tensor):
            raise TypeError(f"{model}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] not in firsts or t.shape[1] != S:
            want = " or ".join(str((b, S)) for b in firsts)
            raise ValueError(f"{model}: {name} must have the shape of input_ids {want}, got {tuple(t.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{model}: {name} is on {t.device} but input_ids is on {input_ids.device}")
        _integer(model, name, t, what, bool_ok=name == "attention_mask")
    stats = torch.stack([f(t).to(torch.long) for t, *_ in args.values() for f in (torch.amin, torch.amax)])
    values = stats.tolist()  # one host copy for every range
    for i, (name, (_, _, (lo, hi), _)) in enumerate(args.items()):
        mn, mx = values[2 * i], values[2 * i + 1]
        if mn < lo or mx >= hi:
            allowed = "be 0 or 1" if name == "attention_mask" else f"lie in [{lo}, {hi})"
            raise ValueError(f"{model}: {name} must {allowed}, got values in [{mn}, {mx}]")


def _integer(model: str, name: str, t: Tensor, what: str, bool_ok: bool = False) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or (t.dtype == torch.bool and not bool_ok):
        kind = "an integer or bool" if bool_ok else "an integer"
        raise InputDTypeError(f"{model}: {name} must be {kind} tensor ({what}), got {t.dtype}")


def init_weights(module: nn.Module, std: float) -> None:
    """transformers' init: normal(0, std) for linear and embedding weights, zero biases,
    LayerNorm at identity."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def activation_name(model: str, hf_act: str) -> str:
    """transformers' activation name -> fastlm.ops.ffn's."""
    table = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    if hf_act not in table:
        raise ValueError(f"{model}: activation {hf_act!r} is not supported (supported: {', '.join(table)})")
    return table[hf_act]


def decode_layout_(linears) -> None:
    """Keep decode-path nn.Linear weights in the layout their device reads fastest.

    CPU: (in, out) memory viewed as (out, in): single-row GEMVs then run the BLAS layout this CPU
    streams fastest (measured here: 24 GEMVs of 3072x768 in 10.4 ms, against 17.3 ms with
    nn.Linear's own layout). CUDA: plain row-major (out, in), which the GEMV kernels stream.
    Values and shapes never change; only strides do."""
    with torch.no_grad():
        for lin in linears:
            if not isinstance(lin, nn.Linear):  # fastlm linears lay themselves out
                continue
            w = lin.weight
            if w.device.type == "cpu" and w.is_contiguous() and w.dim() == 2:
                lin.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
            elif w.device.type == "cuda" and not w.is_contiguous():
                lin.weight = nn.Parameter(w.detach().contiguous(), requires_grad=False)


# -- the projection seam ---------------------------------------------------------------------
# Every model projection goes through these helpers, so a packed or quantized linear
# (fastlm.quantize) plugs in here once instead of at every call site. With int8_dynamic
# linears, the *_add_layer_norm helpers also hand back their output quantized per token
# (Int8Rows), which the next linear() / ffn*() takes as `xq` instead of quantizing it again.

def _int8_ready(lin: nn.Module, x: Tensor) -> bool:
    return isinstance(lin, Int8DynamicLinear) and lin.fused_ready(x)


def linear(lin: nn.Module, x: Tensor, *, activation: str | None = None, residual: Tensor | None = None,
           xq: Int8Rows | None = None) -> Tensor:
    """act(x @ W^T + b) (+ residual) through `lin`: an nn.Linear, or a packed / quantized fastlm
    linear (fastlm.linear), which fuses the activation ("gelu" | "gelu_tanh") and the residual
    add into its kernel. x (..., in) -> (..., out). `xq`: x quantized per token (from
    linear_add_layer_norm / ffn_add_layer_norm), which an int8_dynamic linear reads instead of
    quantizing x; other linears ignore it."""
    if xq is not None and _int8_ready(lin, x) and lin.takes(xq):
        r = None if residual is None else residual.reshape(-1, lin.out_features)  # (M, out)
        y = lin.forward_int8(xq.q, xq.scale, activation=activation, residual=r, xo=xq.xo)  # (M, out)
        return y.view(*x.shape[:-1], lin.out_features)
    if isinstance(lin, (FastLinear, CPULinear)):
        return lin(x, activation=activation, residual=residual)
    y = lin(x)
    if activation is not None:
        y = torch.nn.functional.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y if residual is None else y + residual


def linear_add_layer_norm(lin: nn.Module, x: Tensor, residual: Tensor, ln: nn.LayerNorm, *,
                          xq: Int8Rows | None = None) -> tuple[Tensor, Int8Rows | None]:
    """h = ln(residual + lin(x)) -> (h, hq). x (..., in), residual and h (..., out). An int8_dynamic
    `lin` runs its epilogue, the residual add, the LayerNorm and the per-token quantization of h
    for the next int8 linear as one pass over the rows (hq: Int8Rows of h); other linears give
    hq None. `xq` as in linear(). hq is quantized for lin.next_outliers (the outlier channels of
    the int8 linear h feeds, fastlm.quantize_)."""
    if _int8_ready(lin, x):
        if xq is None or not lin.takes(xq):
            xq = lin.quantize_input(x)  # (M, in) int8 rows, outlier channels in float32
        r = residual.reshape(-1, lin.out_features)  # (M, out)
        h, hq = lin.forward_add_layer_norm(xq, r, ln.weight, ln.bias, ln.eps, lin.next_outliers)  # (M, out), Int8Rows
        return h.view(residual.shape), hq
    y = linear(lin, x)  # (..., out)
    return ops.layer_norm(y, ln.weight, ln.bias, ln.eps, residual=residual)[0], None


def ffn(fc: nn.Module, proj: nn.Module, x: Tensor, activation: str, residual: Tensor | None = None, *,
        xq: Int8Rows | None = None) -> Tensor:
    """proj(act(fc(x))) (+ residual). x (..., d_model) -> (..., d_model); fc: d_model -> d_ff,
    proj: d_ff -> d_model; activation "gelu" (erf) or "gelu_tanh". Packed / quantized fastlm
    linears run their kernels with the activation and residual fused into the epilogues; plain
    weights go to fastlm.ops.ffn. `xq` as in linear()."""
    if _int8_ready(fc, x) and isinstance(proj, Int8DynamicLinear):
        hq = fc.forward_to_int8(x, activation=activation, xq=xq, outliers=proj.outliers)  # (M, d_ff) Int8Rows
        r = None if residual is None else residual.reshape(-1, proj.out_features)
        y = proj.forward_int8(hq.q, hq.scale, residual=r, xo=hq.xo)  # (M, d_model)
        return y.view(*x.shape[:-1], proj.out_features)
    cpu = all(isinstance(m, CPULinear) and m.fused_ready(x) for m in (fc, proj))  # oneDNN, packed weights
    if cpu or not all(isinstance(getattr(m, "weight", None), Tensor) for m in (fc, proj)):  # packed / int8
        h = linear(fc, x, activation=activation, xq=xq)  # (..., d_ff)
        return linear(proj, h, residual=residual)
    return ops.ffn(x, fc.weight, fc.bias, proj.weight, proj.bias, activation=activation, residual=residual)


def ffn_add_layer_norm(fc: nn.Module, proj: nn.Module, x: Tensor, activation: str, ln: nn.LayerNorm, *,
                       xq: Int8Rows | None = None) -> tuple[Tensor, Int8Rows | None]:
    """h = ln(x + ffn(x)) -> (h, hq), x and h (..., d_model): ffn() then the residual LayerNorm. Two
    int8_dynamic linears keep the d_ff activation int8 and end in linear_add_layer_norm's fused
    pass (hq: Int8Rows of h for the next int8 linear); otherwise hq is None. `xq` as in linear()."""
    if _int8_ready(fc, x) and _int8_ready(proj, x):
        hq = fc.forward_to_int8(x, activation=activation, xq=xq, outliers=proj.outliers)  # (M, d_ff) Int8Rows
        h, out_q = proj.forward_add_layer_norm(hq, x.reshape(-1, proj.out_features), ln.weight, ln.bias, ln.eps,
                                               proj.next_outliers)  # (M, d_model), Int8Rows
        return h.view(x.shape), out_q
    f = ffn(fc, proj, x, activation, xq=xq)  # (..., d_model)
    return ops.layer_norm(f, ln.weight, ln.bias, ln.eps, residual=x)[0], None
