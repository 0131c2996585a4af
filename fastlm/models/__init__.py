from fastlm.models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel
from fastlm.models.gpt2 import GPT2LMHeadModel
from fastlm.models.loading import WeightError, from_pretrained

__all__ = [
    "BertModel",
    "BertForSequenceClassification",
    "BertForMaskedLM",
    "GPT2LMHeadModel",
    "WeightError",
    "from_pretrained",
]
