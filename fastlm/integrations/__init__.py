"""fastlm.optimize / fastlm.restore: fastlm's kernels inside transformers models, wherever they sit.

`optimize(module)` walks any nn.Module (a transformers model, a sentence-transformers
SentenceTransformer, a user's wrapper; a pipeline's `.model`) and patches every supported
transformers model it finds, in place. One small patcher per architecture kind (bert.py for the
BERT / RoBERTa / XLM-R / CamemBERT layers, distilbert.py, gpt2.py) in a table. Only the given
instances change: attention switches to the "fastlm" implementation (their config), and a few
modules get instance-level forwards; classes, parameters and state_dict stay as they were, so
`model(**inputs)`, `generate()`, `encode()` and `save_pretrained()` keep working.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

from torch import nn

from fastlm.integrations import attention, bert, distilbert, gpt2
from fastlm.integrations.common import clear_forwards

_TASKS = ("Model", "ForSequenceClassification", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering")
SUPPORTED = {
    **{f"{fam}{task}": "bert" for fam in ("Bert", "Roberta", "XLMRoberta", "Camembert") for task in _TASKS},
    **{f"DistilBert{task}": "distilbert" for task in _TASKS},
    "GPT2Model": "gpt2",
    "GPT2LMHeadModel": "gpt2",
    "GPT2ForSequenceClassification": "gpt2",
}
PATCHERS = {"bert": bert, "distilbert": distilbert, "gpt2": gpt2}
STATE = "_fastlm_optimized"
M = TypeVar("M")  # the module (or pipeline) given is the one returned


def _kind(module) -> str | None:
    """The patcher kind of a transformers model class (or a subclass of one), else None."""
    for c in type(module).__mro__:
        if c.__name__ in SUPPORTED and c.__module__.startswith("transformers."):
            return SUPPORTED[c.__name__]
    return None


def _targets(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Supported transformers models inside `module` (itself included), outermost first; the
    inside of a found model is not searched again (its BertModel belongs to it)."""
    kind = _kind(module)
    if kind is not None:
        return [(module, kind)]
    found = []
    for child in module.children():
        found += _targets(child)
    return found


def _check(model) -> None:
    params = list(model.parameters())
    if any(p.is_meta for p in params):
        raise ValueError("fastlm.optimize: the model has weights on the meta device; load real weights first")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"fastlm.optimize: the model is spread over {sorted(map(str, devices))}; "
                         "move it to one device first")


def _unwrap(module, fn: str) -> nn.Module:
    if isinstance(module, nn.Module):
        return module
    inner = getattr(module, "model", None)  # a transformers pipeline
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"fastlm.{fn}: expected an nn.Module (or a pipeline holding one), got {type(module).__name__}")


def optimize(module: M, *, quantize: str | None = None) -> M:
    """Swap the hot path (attention, FFN, LayerNorm) of every supported transformers model inside
    `module` in place and return `module`: a transformers model, a SentenceTransformer, a user's
    nn.Module wrapper, or a pipeline (its `.model`). Idempotent; `fastlm.restore(module)` undoes it.

    Supported (fastlm.integrations.SUPPORTED): BERT, RoBERTa, XLM-RoBERTa, CamemBERT and DistilBERT
    (Model and the SequenceClassification / TokenClassification / QuestionAnswering / MaskedLM
    heads), GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification.
    quantize: None, "int8" or "int8_dynamic" (fastlm.quantize): the projections become int8
    (checked before any change; restore puts back the dequantized weights).
    Raises TypeError when `module` holds none of them, ValueError for an unknown quantize mode,
    weights on the meta device or spread over devices."""
    from fastlm.quantize import check_mode_name

    check_mode_name(quantize)
    root = _unwrap(module, "optimize")
    targets = _targets(root)
    if not targets:
        raise TypeError(f"fastlm.optimize: {type(root).__name__} is not supported and holds no supported "
                        f"transformers model; supported: {', '.join(SUPPORTED)}")
    for model, _ in targets:
        _check(model)
        state = getattr(model, STATE, None)
        if state is not None and quantize != state.get("quantize"):
            raise ValueError(f"fastlm.optimize: the model is already optimized with quantize="
                             f"{state.get('quantize')!r}; fastlm.restore it first")
    for model, kind in targets:
        _optimize_one(model, kind, quantize)
    return module


def _optimize_one(model, kind: str, quantize: str | None) -> None:
    if getattr(model, STATE, None) is not None:
        return
    if quantize is not None:
        from fastlm.quantize import quantize_hf_

        quantize_hf_(model, quantize)
    model_warnings: list[str] = []

    def warn(msg: str) -> None:
        model_warnings.append(msg)
        warnings.warn(f"fastlm.optimize: {msg}", stacklevel=4)

    previous = model.config._attn_implementation
    pet = getattr(model.config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        warn(f"attention keeps transformers' code: position_embedding_type {pet!r}")
    else:
        attention.register()
        model.set_attn_implementation(attention.NAME)
    PATCHERS[kind].patch(model, warn)
    model.__dict__[STATE] = {"attn_implementation": previous, "kind": kind, "warnings": model_warnings,
                             "quantize": quantize}


def restore(module: M) -> M:
    """Undo fastlm.optimize on every model inside `module` (a no-op where it never ran); quantized
    projections come back as float modules holding the dequantized weights."""
    root = _unwrap(module, "restore")
    for model in list(root.modules()):
        state = model.__dict__.pop(STATE, None)
        if state is None:
            continue
        clear_forwards(model)
        PATCHERS[state["kind"]].unpatch(model)
        if state.get("quantize") is not None:
            from fastlm.quantize import dequantize_hf_

            dequantize_hf_(model)
        model.set_attn_implementation(state["attn_implementation"])
    return module


def is_optimized(module) -> bool:
    """Whether fastlm.optimize has patched `module` or a model inside it."""
    return any(getattr(m, STATE, None) is not None for m in _unwrap(module, "is_optimized").modules())
