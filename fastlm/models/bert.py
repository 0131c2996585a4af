"""BERT on fastlm.ops: BertModel and the SequenceClassification / MaskedLM heads.
Names follow transformers' BERT; the one structural change is the fused QKV
projection `attention.qkv` (rows [query; key; value])."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastlm import ops
from fastlm.linear_cpu import CPULinear
from fastlm.models.common import (
    BaseModelOutput,
    LogitsOutput,
    W,
    activation_name,
    check_ids,
    ffn,
    init_weights,
    linear,
)


def _ln(module: nn.LayerNorm, x: Tensor, residual: Optional[Tensor] = None):
    if residual is None:
        return ops.layer_norm(x, module.weight, module.bias, module.eps)
    return ops.layer_norm(x, module.weight, module.bias, module.eps, residual=residual)[0]


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        S = input_ids.shape[1]
        pos = torch.arange(S, device=input_ids.device)[None]  # (1, S)
        e = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(pos)
        return _ln(self.LayerNorm, e)  # (B, S, C)


class BertAttentionOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = CPULinear(config.hidden_size, config.hidden_size)  # oneDNN on CPU rows >= 32
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, H = config.hidden_size, config.num_attention_heads
        if C % H:
            raise ValueError(f"BERT: hidden_size {C} is not divisible by num_attention_heads {H}")
        self.n_head, self.head_dim = H, C // H
        self.qkv = CPULinear(C, 3 * C)  # fused from self.query, self.key, self.value
        self.output = BertAttentionOutput(config)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], varlen: Optional[tuple] = None) -> Tensor:
        """x (B, S, C) with an optional key_padding_mask, or packed tokens (T, C) with
        varlen = (cu_seqlens, max_seqlen)."""
        if varlen is None:
            B, S, C = x.shape
            qkv = linear(self.qkv, x).view(B, S, 3, self.n_head, self.head_dim)  # (B, S, 3, H, D)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, H, S, D), strided views
            y = ops.attention(q, k, v, key_padding_mask=key_padding_mask)  # (B, H, S, D)
            y = y.transpose(1, 2).reshape(B, S, C)  # (B, S, C)
        else:
            T, C = x.shape
            qkv = linear(self.qkv, x).view(T, 3, self.n_head, self.head_dim)  # (T, 3, H, D)
            q, k, v = qkv.unbind(1)  # 3 x (T, H, D), strided views
            y = ops.attention_varlen_checked(q, k, v, varlen[0], varlen[1], False, self.head_dim**-0.5)
            y = y.reshape(T, C)  # (T, C)
        return _ln(self.output.LayerNorm, linear(self.output.dense, y), residual=x)  # LN(x + dense(y))


class BertLinear(nn.Module):
    """Holds a `dense` Linear under transformers' name (intermediate.dense, output.dense)."""

    def __init__(self, d_in: int, d_out: int, eps: Optional[float] = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertLinear(config.hidden_size, config.intermediate_size)
        self.output = BertLinear(config.intermediate_size, config.hidden_size, eps=config.layer_norm_eps)
        self.activation = activation_name("BERT", config.hidden_act)

    def forward(self, h: Tensor, key_padding_mask: Optional[Tensor], varlen: Optional[tuple] = None) -> Tensor:
        a = self.attention(h, key_padding_mask, varlen)  # (B, S, C) or packed (T, C)
        f = ffn(self.intermediate.dense, self.output.dense, a, self.activation)  # (B, S, C)
        return _ln(self.output.LayerNorm, f, residual=a)  # LN(a + ffn(a))


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, C) from the [CLS] token


class BertModel(nn.Module):
    """transformers' BertModel for inference: forward(input_ids, attention_mask, token_type_ids)
    -> .last_hidden_state (B, S, C), .pooler_output (B, C) (None without a pooler)."""

    model_type = "bert"

    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        pet = getattr(config, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"BertModel: position_embedding_type {pet!r} is not supported (only 'absolute')")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("BertModel: decoder / cross-attention configurations are not supported")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def init_random(self):
        init_weights(self, self.config.initializer_range)
        return self

    def check_inputs(self, input_ids, attention_mask, token_type_ids) -> None:
        cfg = self.config
        check_ids(type(self).__name__, input_ids, cfg.vocab_size, cfg.max_position_embeddings, attention_mask,
                  token_type_ids=token_type_ids)
        if token_type_ids is not None and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= cfg.type_vocab_size):
            raise ValueError(f"{type(self).__name__}: token_type_ids must lie in [0, {cfg.type_vocab_size})")

    @torch.inference_mode()
    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None
    ) -> BaseModelOutput:
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids)  # (B, S, C)
        keep = None if attention_mask is None else attention_mask.to(device=self.device, dtype=torch.bool)
        if keep is not None and not bool(keep.all()) and bool(keep.any()):
            h = self._encode_unpadded(h, keep)
        else:
            for layer in self.encoder.layer:
                h = layer(h, keep)
        pooled = self.pooler(h) if self.pooler is not None else None
        return BaseModelOutput(last_hidden_state=h, pooler_output=pooled)

    def _encode_unpadded(self, h: Tensor, keep: Tensor) -> Tensor:
        """Remove padding once, run every layer on packed tokens (varlen attention), pad once
        at the end: no layer spends work on padding. Padded positions come back as 0."""
        B, S, C = h.shape
        lens = keep.sum(1, dtype=torch.int32)  # (B,)
        idx = keep.flatten().nonzero().squeeze(1)  # (T,) token positions in (B*S)
        cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
        varlen = (cu, int(lens.max()))
        x = h.reshape(B * S, C).index_select(0, idx)  # (T, C)
        for layer in self.encoder.layer:
            x = layer(x, None, varlen)
        return x.new_zeros(B * S, C).index_copy_(0, idx, x).view(B, S, C)  # (B, S, C)

    # -- weights -------------------------------------------------------------------------
    @staticmethod
    def hf_prefixes() -> tuple[str, ...]:
        return ("bert.",)

    @staticmethod
    def hf_ignored(key: str) -> bool:
        """Buffers and the heads of other BERT tasks, which a BertModel does not use."""
        return key.endswith(("position_ids", "embeddings.token_type_ids")) or key.startswith(
            ("cls.", "classifier.", "qa_outputs.")
        )

    def weight_map(self) -> list[W]:
        m = [
            W(f"embeddings.{n}.weight", (f"embeddings.{n}.weight",))
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
        ]
        m += [W(f"embeddings.LayerNorm.{t}", (f"embeddings.LayerNorm.{t}",)) for t in ("weight", "bias")]
        for i in range(self.config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for t in ("weight", "bias"):
                m += [
                    W(p + f"attention.qkv.{t}", tuple(p + f"attention.self.{n}.{t}" for n in ("query", "key", "value")), "cat"),
                    W(p + f"attention.output.dense.{t}", (p + f"attention.output.dense.{t}",)),
                    W(p + f"attention.output.LayerNorm.{t}", (p + f"attention.output.LayerNorm.{t}",)),
                    W(p + f"intermediate.dense.{t}", (p + f"intermediate.dense.{t}",)),
                    W(p + f"output.dense.{t}", (p + f"output.dense.{t}",)),
                    W(p + f"output.LayerNorm.{t}", (p + f"output.LayerNorm.{t}",)),
                ]
        if self.pooler is not None:
            m += [W(f"pooler.dense.{t}", (f"pooler.dense.{t}",)) for t in ("weight", "bias")]
        return m

    def optional_hf(self) -> tuple[str, ...]:
        return ()


class _BertWithHead(nn.Module):
    """A BertModel under `bert.` plus a task head; weights keep transformers' names."""

    model_type = "bert"
    add_pooling_layer = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=self.add_pooling_layer)

    device = property(lambda self: self.bert.device)
    dtype = property(lambda self: self.bert.dtype)

    def init_random(self):
        init_weights(self, self.config.initializer_range)
        return self

    @staticmethod
    def hf_prefixes() -> tuple[str, ...]:
        return ()

    @staticmethod
    def hf_ignored(key: str) -> bool:
        return key.endswith(("position_ids", "embeddings.token_type_ids"))

    def weight_map(self) -> list[W]:
        base = [W("bert." + w.ours, tuple("bert." + s for s in w.hf), w.how) for w in self.bert.weight_map()]
        return base + self.head_map()

    def optional_hf(self) -> tuple[str, ...]:
        return ()


class BertForSequenceClassification(_BertWithHead):
    """forward(...) -> .logits (B, num_labels), from the pooled [CLS] state."""

    def __init__(self, config):
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def head_map(self) -> list[W]:
        return [W(f"classifier.{t}", (f"classifier.{t}",)) for t in ("weight", "bias")]

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids).pooler_output  # (B, C)
        return LogitsOutput(logits=self.classifier(pooled))  # (B, num_labels)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = {"gelu": "none", "gelu_tanh": "tanh"}[activation_name("BERT", config.hidden_act)]

    def forward(self, h: Tensor) -> Tensor:
        x = ops.bias_gelu(nn.functional.linear(h, self.dense.weight), self.dense.bias, approximate=self.approximate)
        return _ln(self.LayerNorm, x)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return nn.functional.linear(self.transform(h), self.decoder.weight, self.bias)  # (B, S, vocab)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(_BertWithHead):
    """forward(...) -> .logits (B, S, vocab)."""

    add_pooling_layer = False

    def __init__(self, config):
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def head_map(self) -> list[W]:
        p = "cls.predictions."
        m = [W(p + f"transform.dense.{t}", (p + f"transform.dense.{t}",)) for t in ("weight", "bias")]
        m += [W(p + f"transform.LayerNorm.{t}", (p + f"transform.LayerNorm.{t}",)) for t in ("weight", "bias")]
        return m + [W(p + "bias", (p + "bias",))]

    def optional_hf(self) -> tuple[str, ...]:
        # tied to the word embeddings; decoder.bias is the same tensor as predictions.bias
        return ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        h = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        return LogitsOutput(logits=self.cls.predictions(h))
