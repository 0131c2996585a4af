"""fastlm.quantize_: swap a model's projections for int8 ones in place.

Modes (DESIGN.md):
- "int8": weight-only, per output channel, symmetric (scale = absmax / 127, q = round(w / scale)
  in [-127, 127]); activations stay float, so the model computes what transformers computes on
  the dequantized weights. Kernels: CPU float32, CUDA fp16 / bf16 / fp32 (fastlm.linear.Int8Linear).
- "int8_dynamic": the same int8 weights, activations quantized per token at run time, int8 GEMM
  with int32 accumulation (torch._int_mm); CPU float32 (fastlm.linear.Int8DynamicLinear).
  BERT-family encoders (fastlm's and transformers') also get static outlier channels, chosen here
  at quantization time (choose_outliers): the model runs once in float32 on a fixed seeded batch
  of random token ids (CALIBRATION_SHAPE), each projection's input channels whose absmax there
  exceeds OUTLIER_RATIO x that projection's median channel absmax are outliers, pooled per input
  width (at most MAX_OUTLIERS, largest ratio first) so that a LayerNorm'd output is quantized
  once for the linear it feeds. Those channels are computed in float32 (their activations and
  original weight columns; LLM.int8()-style, Dettmers et al. 2022), the rest in int8 with
  per-token scales that no longer see them. Why: BERT's [CLS] rows carry one massive channel
  (all-MiniLM-L6-v2: channel 99, ~28 at the FFN input where other channels are < 4), which made
  the per-token scale coarse for every other channel. Measured on the real all-MiniLM-L6-v2 over
  the 1,000 texts of fastlm.testing.accuracy_texts (one-word texts included), cosine to fp32
  min / p1 / median: 0.9611 / 0.9805 / 0.9970 before, 0.9963 / 0.9973 / 0.99951 with the outlier
  channels (weight-only "int8": 0.9942 / 0.9963 / 0.99958), at no loss of speed (B8 S128, MiniLM
  and BERT-base; docs/design.md, bench/int8dyn_accuracy.py, bench/int8dyn_speed.py). GPT-2 keeps
  plain per-token int8 (no outlier channels). Raises nothing new: a model the calibration pass
  cannot run through gets no outlier channels.

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
    share_arena_,
)

log = logging.getLogger("fastlm")
MODES = ("int8", "int8_dynamic")
# int8_dynamic outlier channels (module docstring; measured on all-MiniLM-L6-v2, docs/design.md)
OUTLIER_RATIO = 4.0  # calibration absmax over the projection's median channel absmax
MAX_OUTLIERS = 16  # per input width
CALIBRATION_SHAPE = (4, 16)  # (batch, tokens) of seeded random token ids
CALIBRATION_SEED = 0
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


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The fastlm BERT-family base model of `model` (itself or a task head's), else None."""
    from fastlm.models.bert import BertModel

    enc = model if isinstance(model, BertModel) else getattr(model, "encoder_model", None)
    return enc if isinstance(enc, BertModel) else None


def calibration_ids(vocab_size: int, device: torch.device, max_positions: int | None = None) -> torch.Tensor:
    """The fixed calibration batch: CALIBRATION_SHAPE int64 token ids (fewer tokens where the
    model has fewer positions: max_positions - 2, RoBERTa's offset) drawn with CALIBRATION_SEED
    from [min(1000, vocab_size // 4), vocab_size) (past BERT's special and unused ids)."""
    if vocab_size < 2:
        raise ValueError(f"quantize: vocab_size must be >= 2 to calibrate, got {vocab_size}")
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    low = min(1000, vocab_size // 4)
    ids = torch.randint(low, vocab_size, CALIBRATION_SHAPE, generator=g)
    if isinstance(max_positions, int):
        ids = ids[:, : max(1, max_positions - 2)]
    return ids.to(device)


def _calibration_failed(model: nn.Module, err: Exception) -> None:
    log.warning("quantize='int8_dynamic': the calibration pass failed on %s (%s: %s); no outlier channels "
                "(plain per-token int8 activations)", type(model).__name__, type(err).__name__, err)


class _Recorder(nn.Module):
    """Stands in for a projection during calibration: records the running per-channel absmax of
    its input (..., K) in `absmax` (K,) float32 and returns the projection's output. It has no
    `weight`, so the model's helpers call it as a plain module (every input passes through it)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.absmax = inner, None

    def forward(self, x):
        a = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()  # (K,)
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        return self.inner(x)


def choose_outliers(absmax: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Outlier input channels per input width from each projection's calibration absmax (K,):
    channel j of a projection qualifies when absmax[j] > OUTLIER_RATIO * median(absmax); the
    qualifying channels of all projections of one width K are pooled, ranked by their largest
    ratio (ties: lower index), and at most MAX_OUTLIERS kept -> {K: sorted int64 indices}
    (widths with none are left out). Deterministic for given inputs."""
    best: dict[int, dict[int, float]] = {}
    for a in absmax:
        ratio = a / a.median().clamp_min(1e-12)  # (K,)
        pool = best.setdefault(a.numel(), {})
        for j in (ratio > OUTLIER_RATIO).nonzero().flatten().tolist():
            pool[j] = max(pool.get(j, 0.0), float(ratio[j]))
    out = {}
    for width, pool in best.items():
        keep = sorted(pool, key=lambda j: (-pool[j], j))[:MAX_OUTLIERS]
        if keep:
            out[width] = torch.tensor(sorted(keep), dtype=torch.int64)
    return out


@torch.no_grad()
def _calibrate_fastlm(model: nn.Module, slots: list[tuple[nn.Module, str]]) -> list[torch.Tensor] | None:
    """Each projection's input absmax (K,) on the calibration batch (fastlm BERT-family models),
    in `slots` order; None for other models."""
    enc = _encoder_of(model)
    if enc is None:
        return None
    recs = []
    try:
        for parent, attr in slots:
            rec = _Recorder(getattr(parent, attr))
            setattr(parent, attr, rec)
            recs.append(rec)
        enc(calibration_ids(enc.config.vocab_size, enc.device, getattr(enc.config, "max_position_embeddings", None)))
    except (RuntimeError, ValueError, IndexError) as err:
        _calibration_failed(model, err)
        return None
    finally:
        for (parent, attr), rec in zip(slots, recs, strict=False):  # recs may be shorter after an error
            setattr(parent, attr, rec.inner)
    if any(r.absmax is None for r in recs):
        return None  # a projection the forward does not reach: no outlier channels
    return [r.absmax for r in recs]


def _outlier_sets(absmax: list[torch.Tensor] | None, n: int) -> list[torch.Tensor | None]:
    if absmax is None:
        return [None] * n
    sets = choose_outliers(absmax)
    return [sets.get(a.numel()) for a in absmax]


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
    absmax = _calibrate_fastlm(model, slots) if mode == "int8_dynamic" else None
    outliers = _outlier_sets(absmax, len(slots))
    sets = {} if absmax is None else choose_outliers(absmax)
    with torch.no_grad():
        for (parent, attr), o in zip(slots, outliers, strict=True):
            lin = getattr(parent, attr)
            q = cls.from_linear(lin) if mode == "int8" else cls.from_linear(lin, o)
            if mode == "int8_dynamic":
                nxt = sets.get(q.out_features)
                q.next_outliers = nxt  # the same tensor as its consumers' outliers: takes() matches by identity
            setattr(parent, attr, q.to(device))
        if tied_emb is not None:
            parent, attr, head = tied_emb
            setattr(parent, attr, Int8TiedEmbedding(head(), dtype))
        if mode == "int8" and device.type == "cpu" and hasattr(model, "decode_linears"):
            # the decode step's int8 panels in one huge-page run, in step order: alone, the 1.8 MB c_attn
            # and 0.6 MB attn.c_proj panels sat on 4 KiB pages (below pack_int8_panels' 2 MiB floor) and
            # streamed at ~60% of the rate of the others (docs/design.md "CPU threads")
            share_arena_([lin for lin in model.decode_linears()
                          if isinstance(lin, Int8Linear) and lin.qweight.dim() == 3], attr="qweight")
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
    outliers = [None] * len(slots)
    if mode == "int8_dynamic" and not any(isinstance(mod, Conv1D) for _, _, mod in slots):  # BERT family
        outliers = _outlier_sets(_calibrate_hf(model, [mod for _, _, mod in slots]), len(slots))
    with torch.no_grad():
        for (parent, attr, mod), o in zip(slots, outliers, strict=True):
            conv = isinstance(mod, Conv1D)
            w = mod.weight.t() if conv else mod.weight  # (out, in)
            inner = (cls(w, mod.bias) if mode == "int8" else cls(w, mod.bias, o)).to(device)
            if emb is not None and mod.weight is emb.weight:  # a tied head: the embedding is its round trip,
                emb.weight.copy_(inner.dequantized().to(emb.weight.dtype))  # as transformers on dequantized weights
            setattr(parent, attr, HFQuantized(inner, "conv1d" if conv else "linear"))
    return len(slots)


@torch.no_grad()
def _calibrate_hf(model: nn.Module, mods: list[nn.Module]) -> list[torch.Tensor] | None:
    """Each module's input absmax (K,) on the calibration batch (a transformers encoder), or None
    when the model cannot run it (no vocab_size) or a module is not reached."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        return None
    found: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(mod, args):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            found[i] = a if i not in found else torch.maximum(found[i], a)
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mods)]
    try:
        device = next(model.parameters()).device
        model(input_ids=calibration_ids(vocab, device, getattr(model.config, "max_position_embeddings", None)))
    except (RuntimeError, ValueError, IndexError) as err:
        _calibration_failed(model, err)
        return None
    finally:
        for h in handles:
            h.remove()
    return [found[i] for i in range(len(mods))] if len(found) == len(mods) else None


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
