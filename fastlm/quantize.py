"""fastlm.quantize_: swap a model's projections for int8 ones in place.

Modes (DESIGN.md):
- "int8": weight-only, per output channel, symmetric (scale = absmax / 127, q = round(w / scale)
  in [-127, 127]); activations stay float, so the model computes what transformers computes on
  the dequantized weights. Kernels: CPU float32, CUDA fp16 / bf16 / fp32 (fastlm.linear.Int8Linear).
- "int8_dynamic": the same int8 weights, activations quantized per token at run time, int8 GEMM
  with int32 accumulation (torch._int_mm); CPU float32 (fastlm.linear.Int8DynamicLinear).
  Accuracy: on the real all-MiniLM-L6-v2 its cosine to fp32 drops to 0.961 on one-word texts
  ("Thank you!"; median 0.997 over fastlm.testing.accuracy_texts); weight-only "int8" stays >= 0.994.
  See docs/design.md (quantization) and bench/int8dyn_accuracy.py.

Quantized: QKV, the attention output projection, both FFN projections and the LM head (a model's
`projections()` lists them; fastlm's BERT/GPT-2 layouts are recognised by name otherwise).
Embeddings, LayerNorm and biases stay in the model dtype; a tied LM head's embedding lookup
reads the head's int8 rows (no full-precision copy of a quantized weight is kept).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from fastlm import _ext, cpu_features
from fastlm.linear import (
    FastLinear,
    Int8DynamicLinear,
    Int8Linear,
    Int8TiedEmbedding,
    PackedLinear,
)

log = logging.getLogger("fastlm")
MODES = ("int8", "int8_dynamic")
_CLASSES = {"int8": Int8Linear, "int8_dynamic": Int8DynamicLinear}
# fastlm model names of the projections (GPT-2: h.N.attn.c_attn ...; BERT family: layer.N.attention.qkv ...)
_PROJECTION = re.compile(
    r"(^|\.)(h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    r"|layer\.\d+\.(attention\.qkv|attention\.output\.dense|intermediate\.dense|output\.dense))$|^lm_head$"
)


def check_mode_name(mode: str | None) -> None:
    """Raises ValueError listing the choices when `mode` is not None or one of MODES."""
    if mode is not None and (not isinstance(mode, str) or mode not in MODES):
        raise ValueError(f"quantize must be None or one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")


def check_mode(mode: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Raises ValueError (unknown mode, or no kernel for this device / dtype) before any work."""
    check_mode_name(mode)
    if mode is None:
        return
    if device.type == "cpu":
        if dtype != torch.float32:
            raise ValueError(f"quantize={mode!r} on CPU runs float32 activations (the CPU int8 kernels compute in "
                             f"fp32); got a {dtype} model: load it with dtype=torch.float32")
        if mode == "int8" and not _ext.available():
            raise ValueError(f"quantize='int8' needs fastlm._C (its CPU int8 kernel), which is not loaded: "
                             f"{_ext.LOAD_ERROR}")
    elif device.type == "cuda":
        if mode == "int8_dynamic":
            raise ValueError("quantize='int8_dynamic' runs on CPU only (no CUDA int8 GEMM path); use 'int8' on CUDA")
        if not _ext.cuda_enabled():
            raise ValueError("quantize='int8' on CUDA needs fastlm._C built with its CUDA kernels "
                             "(this build has none: see `fastlm info`)")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"quantize='int8' on CUDA needs a float16, bfloat16 or float32 model, got {dtype}")
    else:
        raise ValueError(f"quantize={mode!r}: no int8 kernel for device {device}")


def warn_if_slow(mode: str | None, device: torch.device) -> None:
    """Log a warning when `mode` runs slower than float32 on this CPU (int8_dynamic without an
    int8 dot-product instruction: fastlm.cpu_features), so that is never a silent surprise."""
    slow = cpu_features.int8_gemm_slow() if mode == "int8_dynamic" and device.type == "cpu" else None
    if slow:
        log.warning("quantize='int8_dynamic': %s", slow)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    raise ValueError("quantize: the model has no floating-point weights")


def projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every projection to quantize: model.projections() when the model
    defines it, else the fastlm GPT-2 / BERT-family names."""
    if hasattr(model, "projections"):
        return list(model.projections())
    found = []
    for name, mod in model.named_modules():
        if _PROJECTION.search(name) and isinstance(mod, (nn.Linear, FastLinear)):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, attr))
    return found


def quantize_(model: nn.Module, mode: str | None) -> nn.Module:
    """Quantize `model`'s projections in place (see the module docstring) and return it.
    mode None is a no-op. Raises ValueError for an unknown mode, a device / dtype without the
    kernel, a model already quantized, or one with no projection found; all before any change."""
    if mode is None:
        return model
    device, dtype = _model_device_dtype(model)
    check_mode(mode, device, dtype)
    warn_if_slow(mode, device)
    slots = projections(model)
    if not slots:
        raise ValueError(f"quantize: found no projection to quantize in {type(model).__name__}")
    cls = _CLASSES[mode]
    for parent, attr in slots:
        lin = getattr(parent, attr)
        if isinstance(lin, (Int8Linear, Int8DynamicLinear)):
            raise ValueError(f"quantize: {type(model).__name__} is already quantized")
        if not isinstance(lin, (nn.Linear, PackedLinear)):
            raise TypeError(f"quantize: {attr} is a {type(lin).__name__}, expected a linear layer")
    tied_emb = getattr(model, "tied_embedding_slot", lambda: None)()
    with torch.no_grad():
        for parent, attr in slots:
            setattr(parent, attr, cls.from_linear(getattr(parent, attr)).to(device))
        if tied_emb is not None:
            parent, attr, head = tied_emb
            setattr(parent, attr, Int8TiedEmbedding(head(), dtype))
    model.__dict__["quantize_mode"] = mode
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct tensors (parameters and buffers, shared storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# -- transformers models (fastlm.optimize(model, quantize=...)) -------------------------------
_HF_PROJECTION = re.compile(
    r"(^|\.)(h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    r"|layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense))$"
    r"|^lm_head$"
)


class HFQuantized(nn.Module):
    """Stands in for a transformers nn.Linear / Conv1D projection after fastlm.optimize(...,
    quantize=...): forward(x) = x @ W^T + b on the int8 weights. `kind` remembers the original
    ("linear" or "conv1d") for fastlm.restore, which puts back a module holding the dequantized
    weights (the full-precision originals are not kept)."""

    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        return self.inner(x)

    def dequantized_module(self) -> nn.Module:
        w = self.inner.dequantized()  # (out, in) float32
        b = self.inner.bias
        dtype = b.dtype if b is not None else torch.float32
        if self.kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            m = Conv1D(w.shape[0], w.shape[1])
            m.weight = nn.Parameter(w.t().contiguous().to(dtype), requires_grad=False)
        else:
            m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            m.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b.clone(), requires_grad=False)
        return m.to(w.device)


def quantize_hf_(model: nn.Module, mode: str) -> int:
    """Swap a transformers BERT / GPT-2 model's projections (QKV, attention out, FFN, LM head) for
    int8 ones in place; returns how many. Checks the mode / device / dtype first (ValueError)."""
    from transformers.pytorch_utils import Conv1D

    device, dtype = _model_device_dtype(model)
    check_mode(mode, device, dtype)
    warn_if_slow(mode, device)
    cls = _CLASSES[mode]
    slots = []
    for name, mod in model.named_modules():
        if _HF_PROJECTION.search(name) and isinstance(mod, (nn.Linear, Conv1D)):
            parent_name, _, attr = name.rpartition(".")
            slots.append((model.get_submodule(parent_name) if parent_name else model, attr, mod))
    if not slots:
        raise ValueError(f"quantize: found no projection to quantize in {type(model).__name__}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    with torch.no_grad():
        for parent, attr, mod in slots:
            conv = isinstance(mod, Conv1D)
            w = mod.weight.t() if conv else mod.weight  # (out, in)
            inner = cls(w, mod.bias).to(device)
            if emb is not None and mod.weight is emb.weight:  # a tied head: the embedding is its round trip,
                emb.weight.copy_(inner.dequantized().to(emb.weight.dtype))  # as transformers on dequantized weights
            setattr(parent, attr, HFQuantized(inner, "conv1d" if conv else "linear"))
    return len(slots)


def dequantize_hf_(model: nn.Module) -> None:
    """Undo quantize_hf_: every HFQuantized goes back to an nn.Linear / Conv1D holding the
    dequantized weights. A tied LM head is tied to the input embedding again."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, HFQuantized):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, mod.dequantized_module())
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
