"""fastlm: fast BERT and GPT-2 inference with fused Triton attention, CUDA FFN kernels and
CUDA-graph decoding. See DESIGN.md for the contract."""

import logging

from fastlm import (
    _ext,  # noqa: F401  (first: loads fastlm._C, which defines torch.ops.fastlm)
    nn,
    ops,
    reference,
)
from fastlm.backend import use_backend
from fastlm.embed import Embedder
from fastlm.integrations import optimize, restore
from fastlm.models import (
    ARCHITECTURES,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    CamembertForMaskedLM,
    CamembertForQuestionAnswering,
    CamembertForSequenceClassification,
    CamembertForTokenClassification,
    CamembertModel,
    DistilBertForMaskedLM,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    WeightError,
    XLMRobertaForMaskedLM,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
    XLMRobertaForTokenClassification,
    XLMRobertaModel,
    from_pretrained,
)
from fastlm.quantize import quantize_

__version__ = "0.1.0"
logging.getLogger("fastlm").addHandler(logging.NullHandler())

__all__ = [
    "nn",
    "ops",
    "reference",
    "use_backend",
    "optimize",
    "Embedder",
    "restore",
    "quantize_",
    "from_pretrained",
    "BertModel",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMaskedLM",
    "RobertaModel",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
    "RobertaForQuestionAnswering",
    "RobertaForMaskedLM",
    "XLMRobertaModel",
    "XLMRobertaForSequenceClassification",
    "XLMRobertaForTokenClassification",
    "XLMRobertaForQuestionAnswering",
    "XLMRobertaForMaskedLM",
    "CamembertModel",
    "CamembertForSequenceClassification",
    "CamembertForTokenClassification",
    "CamembertForQuestionAnswering",
    "CamembertForMaskedLM",
    "DistilBertModel",
    "DistilBertForSequenceClassification",
    "DistilBertForTokenClassification",
    "DistilBertForQuestionAnswering",
    "DistilBertForMaskedLM",
    "GPT2LMHeadModel",
    "GPT2Model",
    "GPT2ForSequenceClassification",
    "ARCHITECTURES",
    "WeightError",
    "__version__",
]
