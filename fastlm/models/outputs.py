"""Model output records with transformers' field names and ModelOutput's indexing: `out.logits`,
`out["logits"]`, `out[0]` and `out.to_tuple()` all work, and fields that are None are skipped
in the tuple view (so `out[0]` is the logits of a head model, the last hidden state of a base
model), as in transformers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor


class ModelOutput:
    """Mixin for dataclasses: the mapping / tuple behaviour of transformers.utils.ModelOutput
    (iteration yields the names of the fields that are set, like a dict)."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return key in self.keys()


@dataclass
class BaseModelOutput(ModelOutput):
    """Encoders and GPT2Model: last_hidden_state (B, S, C); pooler_output (B, C) where the model
    has a pooler."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    """GPT2LMHeadModel: logits (B, S, vocab)."""

    logits: Tensor


@dataclass
class LogitsOutput(ModelOutput):
    """SequenceClassification (B, num_labels), TokenClassification (B, S, num_labels), MaskedLM
    (B, S, vocab): transformers' SequenceClassifierOutput / TokenClassifierOutput / MaskedLMOutput
    without the loss."""

    logits: Tensor


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    """QuestionAnswering: start_logits and end_logits, each (B, S)."""

    start_logits: Tensor
    end_logits: Tensor


# transformers forward keyword arguments that fastlm's models refuse, and why
_REFUSED = {
    "output_hidden_states": "fastlm's models return the final outputs only (no per-layer hidden states)",
    "output_attentions": "fastlm's fused attention never forms the attention weights",
    "labels": "fastlm's models are inference-only and compute no loss",
    "past_key_values": "fastlm keeps its own static KV cache: use model.generate / model.stream",
    "inputs_embeds": "fastlm's models take input_ids",
    "head_mask": "fastlm's attention has no head mask",
}
_TRANSFORMERS_INSTEAD = ("; for this, run the transformers model with fastlm.optimize(model), which keeps "
                         "transformers' forward and its outputs")


def hf_forward(forward):
    """Decorator for the models' forward: transformers' keyword arguments, with their meaning or a
    clear refusal.

    - return_dict: None / True give the output record; False gives `out.to_tuple()` (transformers'
      tuple: the fields that are set, in order).
    - use_cache: accepted and ignored (no past_key_values is returned; generate keeps a KV cache).
    - output_hidden_states / output_attentions: None or False accepted; True raises ValueError
      naming the argument. labels, past_key_values, inputs_embeds, head_mask: ValueError naming it
      unless None. Any other keyword: TypeError naming it."""
    import functools
    import inspect

    params = [p for p in inspect.signature(forward).parameters if p != "self"]

    @functools.wraps(forward)
    def wrapper(self, *args, return_dict: bool | None = None, use_cache: bool | None = None, **kwargs):
        name = type(self).__name__
        for key in list(kwargs):
            if key in _REFUSED:
                value = kwargs.pop(key)
                if value is None or value is False:
                    continue
                shown = "a tensor" if isinstance(value, Tensor) else repr(value)
                raise ValueError(f"{name}.forward: {key}={shown} is not supported: {_REFUSED[key]}"
                                 + _TRANSFORMERS_INSTEAD)
        if return_dict is not None and not isinstance(return_dict, bool):
            raise TypeError(f"{name}.forward: return_dict must be a bool or None, got {type(return_dict).__name__}")
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise TypeError(f"{name}.forward: unexpected keyword argument {unknown[0]!r} (it takes "
                            f"{', '.join(params)}, return_dict, use_cache)")
        out = forward(self, *args, **kwargs)
        return out.to_tuple() if return_dict is False else out

    return wrapper
