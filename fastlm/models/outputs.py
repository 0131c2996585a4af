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
