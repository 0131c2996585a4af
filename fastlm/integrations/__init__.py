"""fastlm.optimize / fastlm.restore: fastlm's kernels inside a transformers BERT or GPT-2 model.

One small patcher per architecture (bert.py, gpt2.py) in a table by model_type. Only the given
instance changes: attention switches to the "fastlm" implementation (its config), and a few
modules get instance-level forwards; classes, parameters and state_dict stay as they were, so
`model(**inputs)`, `generate()` and `save_pretrained()` keep working.
"""

from __future__ import annotations

import warnings

from torch import nn

from fastlm.integrations import attention, bert, gpt2
from fastlm.integrations.common import clear_forwards

SUPPORTED = {
    "BertModel": "bert",
    "BertForSequenceClassification": "bert",
    "BertForMaskedLM": "bert",
    "BertForTokenClassification": "bert",
    "BertForQuestionAnswering": "bert",
    "GPT2Model": "gpt2",
    "GPT2LMHeadModel": "gpt2",
}
PATCHERS = {"bert": bert, "gpt2": gpt2}
STATE = "_fastlm_optimized"


def _check(model) -> str:
    name = type(model).__name__
    if not isinstance(model, nn.Module) or name not in SUPPORTED:
        raise TypeError(f"fastlm.optimize: {name} is not supported; supported: {', '.join(SUPPORTED)}")
    params = list(model.parameters())
    if any(p.is_meta for p in params):
        raise ValueError("fastlm.optimize: the model has weights on the meta device; load real weights first")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"fastlm.optimize: the model is spread over {sorted(map(str, devices))}; "
                         "move it to one device first")
    return SUPPORTED[name]


def optimize(model, quantize=None):
    """Swap the hot path of a transformers BERT or GPT-2 model in place (attention, FFN,
    LayerNorm) and return it. Idempotent; `fastlm.restore(model)` undoes it.
    quantize: None, "int8" or "int8_dynamic" (fastlm.quantize): the projections become int8
    (checked before any change; restore puts back the dequantized weights)."""
    from fastlm.quantize import check_mode_name, quantize_hf_

    check_mode_name(quantize)
    kind = _check(model)
    if getattr(model, STATE, None) is not None:
        if quantize != model.__dict__[STATE].get("quantize"):
            raise ValueError(f"fastlm.optimize: the model is already optimized with quantize="
                             f"{model.__dict__[STATE].get('quantize')!r}; fastlm.restore it first")
        return model
    if quantize is not None:
        quantize_hf_(model, quantize)
    model_warnings: list[str] = []

    def warn(msg: str) -> None:
        model_warnings.append(msg)
        warnings.warn(f"fastlm.optimize: {msg}", stacklevel=3)

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
    return model


def restore(model):
    """Undo fastlm.optimize on this instance (a no-op on a model it never touched)."""
    state = model.__dict__.pop(STATE, None)
    if state is None:
        return model
    clear_forwards(model)
    PATCHERS[state["kind"]].unpatch(model)
    if state.get("quantize") is not None:
        from fastlm.quantize import dequantize_hf_

        dequantize_hf_(model)
    model.set_attn_implementation(state["attn_implementation"])
    return model


def is_optimized(model) -> bool:
    return getattr(model, STATE, None) is not None
