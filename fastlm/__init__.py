"""fastlm: fast BERT and GPT-2 inference with fused Triton attention, CUDA FFN kernels and
CUDA-graph decoding. See DESIGN.md for the contract."""

import logging

from fastlm import _ext  # noqa: F401  (first: loads fastlm._C, which defines torch.ops.fastlm)
from fastlm import nn, ops, reference
from fastlm.backend import use_backend
from fastlm.integrations import optimize, restore
from fastlm.quantize import quantize_
from fastlm.models import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2LMHeadModel,
    WeightError,
    from_pretrained,
)

__version__ = "0.1.0"
logging.getLogger("fastlm").addHandler(logging.NullHandler())

__all__ = [
    "nn",
    "ops",
    "reference",
    "use_backend",
    "optimize",
    "restore",
    "quantize_",
    "from_pretrained",
    "BertModel",
    "BertForSequenceClassification",
    "BertForMaskedLM",
    "GPT2LMHeadModel",
    "WeightError",
    "__version__",
]
