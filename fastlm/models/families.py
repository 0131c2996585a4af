"""The other BERT families on fastlm's one encoder (fastlm/models/bert.py): RoBERTa (and
XLM-RoBERTa, CamemBERT: the same code under another model_type) and DistilBERT. Each family is its
embeddings, its config reading and a declarative weight map; the heads keep transformers' names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastlm.models.bert import (
    BERT_EMBEDDINGS,
    BERT_LAYER,
    BertEmbeddings,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    BertPreTrainedHead,
    EncoderDims,
    Family,
    _act,
    _lin,
    _ln,
    _same,
    _tied,
    bert_dims,
)
from fastlm.models.common import LogitsOutput, W, activation_name, linear
from fastlm.models.outputs import hf_forward

# -- RoBERTa, XLM-RoBERTa, CamemBERT ---------------------------------------------------------


class RobertaEmbeddings(BertEmbeddings):
    """BERT's embeddings with transformers' create_position_ids_from_input_ids: real tokens
    (id != pad_token_id) count from padding_idx + 1, padding gets padding_idx."""

    def __init__(self, dims: EncoderDims):
        super().__init__(dims)
        if dims.pad_token_id is None:
            raise ValueError("RoBERTa: the config needs pad_token_id (its position ids are counted from it)")
        self.padding_idx = dims.pad_token_id
        self.max_tokens = dims.max_positions - self.padding_idx - 1

    def position_ids(self, input_ids: Tensor) -> Tensor:
        mask = input_ids.ne(self.padding_idx).int()  # (B, S)
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + self.padding_idx  # (B, S)


ROBERTA = Family("RoBERTa", ("roberta", "xlm-roberta", "camembert"), "roberta", "encoder.layer", BERT_LAYER,
                 BERT_EMBEDDINGS, bert_dims, RobertaEmbeddings)


class RobertaModel(BertModel):
    family = ROBERTA


class RobertaClassificationHead(nn.Module):
    """transformers' RobertaClassificationHead: out_proj(tanh(dense(h[:, 0])))."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, h: Tensor) -> Tensor:
        return linear(self.out_proj, torch.tanh(linear(self.dense, h[:, 0])))  # (B, num_labels)


class RobertaForSequenceClassification(BertPreTrainedHead):
    """forward(...) -> .logits (B, num_labels) from the first token (<s>)."""

    base = RobertaModel

    def __init__(self, config):
        super().__init__(config)
        self.classifier = RobertaClassificationHead(config)

    def head_map(self) -> list[W]:
        return _same(*_lin("classifier.dense"), *_lin("classifier.out_proj"))

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        return LogitsOutput(logits=self.classifier(h))


class RobertaForTokenClassification(BertForTokenClassification):
    base = RobertaModel


class RobertaForQuestionAnswering(BertForQuestionAnswering):
    base = RobertaModel


class RobertaLMHead(nn.Module):
    """decoder(layer_norm(gelu(dense(h)))) + bias; transformers' RobertaLMHead (gelu is erf's)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        x = _ln(self.layer_norm, _act("gelu", linear(self.dense, h)))  # (B, S, C)
        return linear(self.decoder, x) + self.bias  # (B, S, vocab)


class RobertaForMaskedLM(BertPreTrainedHead):
    """forward(...) -> .logits (B, S, vocab)."""

    base = RobertaModel

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = RobertaLMHead(config)
        self.retie()

    def retie(self) -> None:
        if _tied(self.config):
            self.lm_head.decoder.weight = self.encoder_model.embeddings.word_embeddings.weight

    def head_map(self) -> list[W]:
        m = _same(*_lin("lm_head.dense"), *_lin("lm_head.layer_norm"), "lm_head.bias")
        return m if _tied(self.config) else m + _same("lm_head.decoder.weight")

    def optional_hf(self) -> tuple[str, ...]:
        return ("lm_head.decoder.weight", "lm_head.decoder.bias")  # tied: embeddings / lm_head.bias

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        return LogitsOutput(logits=self.lm_head(h))


# XLM-RoBERTa and CamemBERT: transformers' code is RoBERTa's, copied under another model_type.
class XLMRobertaModel(RobertaModel):
    pass


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    base = XLMRobertaModel


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    base = XLMRobertaModel


class XLMRobertaForQuestionAnswering(RobertaForQuestionAnswering):
    base = XLMRobertaModel


class XLMRobertaForMaskedLM(RobertaForMaskedLM):
    base = XLMRobertaModel


class CamembertModel(RobertaModel):
    pass


class CamembertForSequenceClassification(RobertaForSequenceClassification):
    base = CamembertModel


class CamembertForTokenClassification(RobertaForTokenClassification):
    base = CamembertModel


class CamembertForQuestionAnswering(RobertaForQuestionAnswering):
    base = CamembertModel


class CamembertForMaskedLM(RobertaForMaskedLM):
    base = CamembertModel


# -- DistilBERT ------------------------------------------------------------------------------

def distilbert_dims(config) -> EncoderDims:
    return EncoderDims(
        hidden=config.dim, heads=config.n_heads, layers=config.n_layers, ffn=config.hidden_dim,
        act=activation_name("DistilBertConfig", config.activation), eps=1e-12,  # transformers hard-codes 1e-12
        vocab=config.vocab_size, max_positions=config.max_position_embeddings, type_vocab=0,
        pad_token_id=getattr(config, "pad_token_id", None),
    )


DISTILBERT_LAYER = {
    "attention.qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}
DISTILBERT = Family("DistilBERT", ("distilbert",), "distilbert", "transformer.layer", DISTILBERT_LAYER,
                    {n: n for n in ("word_embeddings", "position_embeddings", "LayerNorm")}, distilbert_dims,
                    BertEmbeddings)


class DistilBertModel(BertModel):
    """transformers' DistilBertModel: no token types, no pooler (.pooler_output is None)."""

    family = DISTILBERT

    def __init__(self, config, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=False)


class DistilBertForSequenceClassification(BertPreTrainedHead):
    """forward(...) -> .logits (B, num_labels) = classifier(relu(pre_classifier(h[:, 0])))."""

    base = DistilBertModel

    def __init__(self, config):
        super().__init__(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def head_map(self) -> list[W]:
        return _same(*_lin("pre_classifier"), *_lin("classifier"))

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        pooled = torch.relu(linear(self.pre_classifier, h[:, 0]))  # (B, C)
        return LogitsOutput(logits=linear(self.classifier, pooled))


class DistilBertForTokenClassification(BertForTokenClassification):
    base = DistilBertModel


class DistilBertForQuestionAnswering(BertForQuestionAnswering):
    base = DistilBertModel


class DistilBertForMaskedLM(BertPreTrainedHead):
    """forward(...) -> .logits (B, S, vocab) = vocab_projector(vocab_layer_norm(act(vocab_transform(h))))."""

    base = DistilBertModel

    def __init__(self, config):
        super().__init__(config)
        self.activation = activation_name("DistilBertConfig", config.activation)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=1e-12)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.retie()

    def retie(self) -> None:
        if _tied(self.config):
            self.vocab_projector.weight = self.encoder_model.embeddings.word_embeddings.weight

    def head_map(self) -> list[W]:
        m = _same(*_lin("vocab_transform"), *_lin("vocab_layer_norm"), "vocab_projector.bias")
        return m if _tied(self.config) else m + _same("vocab_projector.weight")

    def optional_hf(self) -> tuple[str, ...]:
        return ("vocab_projector.weight",)

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        x = _ln(self.vocab_layer_norm, _act(self.activation, linear(self.vocab_transform, h)))
        return LogitsOutput(logits=linear(self.vocab_projector, x))  # (B, S, vocab)
