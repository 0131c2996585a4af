"""The BERT-family encoder on fastlm.ops, and its task heads.

One encoder implementation serves BERT, RoBERTa, XLM-RoBERTa, CamemBERT and DistilBERT. A family
(`Family`: BERT's is here, the others in fastlm/models/families.py) supplies what differs: how its
config names the sizes, its embeddings (RoBERTa's position ids, DistilBERT's missing token types)
and a declarative map from its checkpoint names to the module names used here. Those module names
are transformers' BERT names for every family; the one structural change is the fused QKV
projection `attention.qkv` (rows [query; key; value]). Heads keep their family's transformers
names (BERT `cls.predictions.*`, RoBERTa `lm_head.*`, DistilBERT `vocab_projector`, ...).

Padding: a padded batch is unpadded once (varlen attention over the real tokens only). transformers
also computes the padded positions, as queries attending to the real keys; fastlm computes only
position 0 among them (the pooler and the classification heads read it; under left padding it is
padding), so every output a user can read equals transformers': real tokens, position 0, the pooler
and the heads. Other padded positions of `last_hidden_state` are 0 (documented, tested), so
per-token heads (token classification, QA, MLM) give their value on a zero state there.
Left padding costs a little extra (one query per such row and layer); right padding none.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlm import _ext, cpu_features, cpu_split, ops
from fastlm.backend import model_entry
from fastlm.linear import Int8DynamicLinear
from fastlm.linear_cpu import CPULinear
from fastlm.models.common import (
    BaseModelOutput,
    Int8Rows,
    LogitsOutput,
    QuestionAnsweringModelOutput,
    W,
    activation_name,
    check_ids,
    ffn_add_layer_norm,
    init_weights,
    linear,
    linear_add_layer_norm,
)
from fastlm.models.outputs import hf_forward


def _ln(module: nn.LayerNorm, x: Tensor, residual: Tensor | None = None):
    if residual is None:
        return ops.layer_norm(x, module.weight, module.bias, module.eps)
    return ops.layer_norm(x, module.weight, module.bias, module.eps, residual=residual)[0]


def _act(name: str, x: Tensor) -> Tensor:
    """A head's activation by fastlm's name ("gelu" exact erf, "gelu_tanh")."""
    return nn.functional.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


# -- families --------------------------------------------------------------------------------

# tokens per chunk from which a bfloat16 forward splits its batch over threads (BertModel._batch_split_ok)
BF16_SPLIT_MIN_ROWS = 256


@dataclass(frozen=True)
class EncoderDims:
    """The sizes an encoder needs, read from any family's config."""

    hidden: int
    heads: int
    layers: int
    ffn: int
    act: str  # fastlm.ops.ffn's name: "gelu" (erf) or "gelu_tanh"
    eps: float
    vocab: int
    max_positions: int  # rows of position_embeddings
    type_vocab: int  # 0: no token types (DistilBERT)
    pad_token_id: int | None


def bert_dims(config) -> EncoderDims:
    return EncoderDims(
        hidden=config.hidden_size, heads=config.num_attention_heads, layers=config.num_hidden_layers,
        ffn=config.intermediate_size, act=activation_name(type(config).__name__, config.hidden_act),
        eps=config.layer_norm_eps, vocab=config.vocab_size, max_positions=config.max_position_embeddings,
        type_vocab=config.type_vocab_size, pad_token_id=getattr(config, "pad_token_id", None),
    )


@dataclass(frozen=True)
class Family:
    """What one family of BERT-like checkpoints changes (see the module docstring).

    prefix      the base model's attribute in transformers' head models and its checkpoint prefix
    layers      checkpoint path of the layer list ("encoder.layer"; DistilBERT "transformer.layer")
    layer_map   ours (under encoder.layer.N.) -> checkpoint names (under `layers`.N.), each one a
                Linear or LayerNorm (.weight and .bias); several names are concatenated (fused QKV)
    embeddings  the embeddings module class; embeddings_map: ours -> checkpoint (under embeddings.)
    """

    name: str
    model_types: tuple[str, ...]
    prefix: str
    layers: str
    layer_map: dict
    embeddings_map: dict
    dims: Callable[..., EncoderDims]
    embeddings: Callable[..., nn.Module]


class BertEmbeddings(nn.Module):
    """word + position (0..S-1) + token type, then LayerNorm."""

    def __init__(self, dims: EncoderDims):
        super().__init__()
        self.word_embeddings = nn.Embedding(dims.vocab, dims.hidden)
        self.position_embeddings = nn.Embedding(dims.max_positions, dims.hidden)
        if dims.type_vocab:
            self.token_type_embeddings = nn.Embedding(dims.type_vocab, dims.hidden)
        self.LayerNorm = nn.LayerNorm(dims.hidden, eps=dims.eps)
        self.max_tokens = dims.max_positions  # longest sequence the position table covers

    def position_ids(self, input_ids: Tensor) -> Tensor:
        S = input_ids.shape[1]
        return torch.arange(S, device=input_ids.device)[None]  # (1, S)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        e = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))  # (B, S, C)
        if hasattr(self, "token_type_embeddings"):
            if token_type_ids is None:
                e = e + self.token_type_embeddings.weight[0]  # type 0 everywhere
            else:
                e = e + self.token_type_embeddings(token_type_ids)
        return _ln(self.LayerNorm, e)  # (B, S, C)


def _pairs(names) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


BERT_LAYER = {
    "attention.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attention.output.dense": "attention.output.dense",
    "attention.output.LayerNorm": "attention.output.LayerNorm",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
    "output.LayerNorm": "output.LayerNorm",
}
BERT_EMBEDDINGS = {n: n for n in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")}
BERT = Family("BERT", ("bert",), "bert", "encoder.layer", BERT_LAYER, BERT_EMBEDDINGS, bert_dims, BertEmbeddings)


# -- the encoder -----------------------------------------------------------------------------

class BertAttentionOutput(nn.Module):
    def __init__(self, dims: EncoderDims):
        super().__init__()
        self.dense = CPULinear(dims.hidden, dims.hidden)  # oneDNN on CPU rows >= 32
        self.LayerNorm = nn.LayerNorm(dims.hidden, eps=dims.eps)


@dataclass
class Ghosts:
    """Padded positions computed as transformers does (queries attending to their row's real
    keys), carried after the T packed tokens: G of them, each reading keys `src` (G, L) of the
    packed stream where `keep` (G, L) is True."""

    src: Tensor  # (G, L) int64 rows of the packed stream
    keep: Tensor  # (G, L) bool


class BertAttention(nn.Module):
    def __init__(self, dims: EncoderDims):
        super().__init__()
        C, H = dims.hidden, dims.heads
        if C % H:
            raise ValueError(f"BERT: hidden_size {C} is not divisible by num_attention_heads {H}")
        self.n_head, self.head_dim = H, C // H
        self.qkv = CPULinear(C, 3 * C)  # fused from self.query, self.key, self.value
        self.output = BertAttentionOutput(dims)

    @model_entry  # inside a model: head dims the kernels do not cover run the reference (one log line)
    def forward(self, x: Tensor, key_padding_mask: Tensor | None, varlen: tuple | None = None,
                ghosts: Ghosts | None = None, xq: Int8Rows | None = None) -> tuple[Tensor, Int8Rows | None]:
        """x (B, S, C) with an optional key_padding_mask, or packed tokens (T + G, C) with
        varlen = (cu_seqlens, max_seqlen) over the first T and `ghosts` for the last G; xq: x
        already quantized per token (int8_dynamic). -> (LN(x + dense(attention)), its int8 rows
        for the next int8_dynamic linear or None), as common.linear_add_layer_norm."""
        if varlen is None:
            B, S, C = x.shape
            qkv = linear(self.qkv, x, xq=xq).view(B, S, 3, self.n_head, self.head_dim)  # (B, S, 3, H, D)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, H, S, D), strided views
            y = ops.attention(q, k, v, key_padding_mask=key_padding_mask)  # (B, H, S, D)
            y = y.transpose(1, 2).reshape(B, S, C)  # (B, S, C)
        else:
            N, C = x.shape
            cu, max_len = varlen
            T = N if ghosts is None else N - ghosts.src.shape[0]
            qkv = linear(self.qkv, x, xq=xq).view(N, 3, self.n_head, self.head_dim)  # (T + G, 3, H, D)
            q, k, v = qkv[:T].unbind(1)  # 3 x (T, H, D), strided views
            y = ops.attention_varlen_checked(q, k, v, cu, max_len, False, self.head_dim**-0.5)
            y = y.reshape(T, C)  # (T, C)
            if ghosts is not None:
                G, L = ghosts.src.shape
                qg = qkv[T:, 0].unsqueeze(2)  # (G, H, 1, D)
                kv = qkv[:T, 1:].index_select(0, ghosts.src.flatten()).view(G, L, 2, self.n_head, self.head_dim)
                kg, vg = (t.transpose(1, 2) for t in kv.unbind(2))  # 2 x (G, H, L, D)
                yg = ops.attention(qg, kg, vg, key_padding_mask=ghosts.keep)  # (G, H, 1, D)
                y = torch.cat([y, yg.reshape(G, C)])  # (T + G, C)
        return linear_add_layer_norm(self.output.dense, y, x, self.output.LayerNorm)  # LN(x + dense(y)), int8 rows


class BertLinear(nn.Module):
    """Holds a `dense` Linear under transformers' name (intermediate.dense, output.dense)."""

    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = CPULinear(d_in, d_out)  # oneDNN on a packed weight on CPU rows >= 32
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class BertLayer(nn.Module):
    def __init__(self, dims: EncoderDims):
        super().__init__()
        self.attention = BertAttention(dims)
        self.intermediate = BertLinear(dims.hidden, dims.ffn)
        self.output = BertLinear(dims.ffn, dims.hidden, eps=dims.eps)
        self.activation = dims.act

    def forward(self, h: Tensor, key_padding_mask: Tensor | None, varlen: tuple | None = None,
                ghosts: Ghosts | None = None, xq: Int8Rows | None = None) -> tuple[Tensor, Int8Rows | None]:
        """-> (the layer's output, its int8 rows for the next layer or None); see BertAttention."""
        a, aq = self.attention(h, key_padding_mask, varlen, ghosts, xq)  # (B, S, C) or packed (T + G, C)
        # LN(a + ffn(a)), same shape, and its int8 rows with int8_dynamic linears
        return ffn_add_layer_norm(self.intermediate.dense, self.output.dense, a, self.activation,
                                  self.output.LayerNorm, xq=aq)


class BertEncoder(nn.Module):
    def __init__(self, dims: EncoderDims):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(dims) for _ in range(dims.layers))


class BertPooler(nn.Module):
    def __init__(self, dims: EncoderDims):
        super().__init__()
        self.dense = nn.Linear(dims.hidden, dims.hidden)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(linear(self.dense, h[:, 0]))  # (B, C) from the first ([CLS]) token


# CPU encoders pad their packed rows to bucket_rows(n) (BertModel._encode_unpadded); False runs
# every batch at its own size (a new set of GEMM shapes per new token count).
BUCKET_ROWS = True


def bucket_rows(n: int) -> int:
    """The row count (>= n) a CPU encoder batch of n packed rows runs at: n rounded up to a multiple
    of max(16, 2^(floor(log2 n) - 3)), i.e. 8 sizes per power of two above 128 and at most 12.5%
    (16 rows below 128) more rows. n <= 0 -> n."""
    if n <= 0:
        return n
    step = max(16, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


def _unpad(keep: Tensor):
    """keep (B, S) bool -> (idx (T,) token rows of (B*S), rows (G,) whose position 0 is padding,
    cu_seqlens (B+1,) int32, max_seqlen, Ghosts for those rows or None when G = 0)."""
    B, S = keep.shape
    lens = keep.sum(1, dtype=torch.int32)  # (B,)
    idx = keep.flatten().nonzero().squeeze(1)  # (T,)
    cu = nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B+1,)
    ghosts = None
    rows = (~keep[:, 0]).nonzero().squeeze(1)  # (G,) rows whose position 0 is padding
    if rows.numel():
        g_lens = lens[rows].long()  # (G,)
        L = max(int(g_lens.max()), 1)
        ar = torch.arange(L, device=keep.device)  # (L,)
        g_keep = ar[None] < g_lens[:, None]  # (G, L)
        src = (cu[rows].long()[:, None] + ar[None]).clamp_max(max(idx.numel() - 1, 0))  # (G, L)
        ghosts = Ghosts(src=src, keep=g_keep)
    return idx, rows, cu, int(lens.max()), ghosts


class BertModel(nn.Module):
    """transformers' BertModel for inference: forward(input_ids, attention_mask, token_type_ids)
    -> .last_hidden_state (B, S, C), .pooler_output (B, C) (None without a pooler).

    On a padded batch, last_hidden_state equals transformers' at real tokens and at position 0
    (computed as transformers does even where it is padding, e.g. under left padding); other padded
    positions are 0."""

    family = BERT

    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        pet = getattr(config, "position_embedding_type", "absolute")
        name = type(self).__name__
        if pet not in (None, "absolute"):
            raise ValueError(f"{name}: position_embedding_type {pet!r} is not supported (only 'absolute')")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError(f"{name}: decoder / cross-attention configurations are not supported")
        self.config = config
        dims = self.family.dims(config)
        self.embeddings = self.family.embeddings(dims)
        self.encoder = BertEncoder(dims)
        self.pooler = BertPooler(dims) if add_pooling_layer else None

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
        name, emb = type(self).__name__, self.embeddings
        n_types = emb.token_type_embeddings.num_embeddings if hasattr(emb, "token_type_embeddings") else None
        if token_type_ids is not None and n_types is None:
            raise ValueError(f"{name}: this model has no token types; token_type_ids must be None")
        check_ids(name, input_ids, emb.word_embeddings.num_embeddings, emb.max_tokens, attention_mask,
                  token_type_ids=token_type_ids, type_vocab_size=n_types)

    @hf_forward
    @torch.inference_mode()
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> BaseModelOutput:
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        ok = self._batch_split_ok()
        n = cpu_split.n_chunks(input_ids, min_rows=BF16_SPLIT_MIN_ROWS if ok == "bf16" else None) if ok else 1
        if n > 1:  # CPU int8_dynamic (or float32 at AVX2): a chunk of the batch per thread (fastlm/cpu_split.py)
            parts = cpu_split.run(self._encode, n, (input_ids, attention_mask, token_type_ids))
            h = torch.cat([p[0] for p in parts])
            pooled = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        else:
            h, pooled = self._encode(input_ids, attention_mask, token_type_ids)
        return BaseModelOutput(last_hidden_state=h, pooler_output=pooled)

    def _batch_split_ok(self) -> bool | str:
        """Whether the forward may split its batch over threads (fastlm/cpu_split.py): int8_dynamic
        models, float32 ones where fastlm._C runs AVX2 (whose one-thread chunks run fastlm's packed
        GEMM: capped Zen 4, BERT-base B8 S128, 2 threads, 0.91x the time of the unsplit oneDNN forward,
        fastlm.linear_cpu.CPULinear.tiles_here), and bfloat16 ones on a CPU with AMX-BF16 (oneDNN's AMX
        bf16 matmul scales poorly over threads at N 768 / K 3072: 2-vCPU Intel Xeon with AMX, BERT-base
        B8 S128, 2 threads, one process alternating: 150 vs 214 ms, 0.70x; 0.67-0.80x from 256 to 768
        tokens per chunk, 0.91x at B32 S64, but 1.12x at 128 tokens per chunk: "bf16", which splits
        only from BF16_SPLIT_MIN_ROWS tokens per chunk). At AVX-512 float32 the split measured 0.99x
        (Zen 4) and 0.97x (the Xeon): not taken. bf16 without AMX: not measured, not taken."""
        if not len(self.encoder.layer):
            return False
        qkv = self.encoder.layer[0].attention.qkv
        if isinstance(qkv, Int8DynamicLinear):
            return True
        if not (isinstance(qkv, CPULinear) and qkv.weight.device.type == "cpu"):
            return False
        if qkv.weight.dtype == torch.bfloat16:  # AMX-BF16, and oneDNN not capped below AMX (ONEDNN_MAX_CPU_ISA)
            cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
            return "bf16" if "amx_bf16" in cpu_features.cpu_flags() and (not cap or "AMX" in cap) else False
        return qkv.weight.dtype == torch.float32 and _ext.available() and torch.ops.fastlm.cpu_isa("") == "avx2"

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None,
                token_type_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The forward on checked inputs -> (last_hidden_state (B, S, C), pooler_output (B, C) or None)."""
        h = self.embeddings(input_ids, token_type_ids)  # (B, S, C)
        keep = None if attention_mask is None else attention_mask.to(device=self.device, dtype=torch.bool)
        bucket = BUCKET_ROWS and h.device.type == "cpu"  # CPU: packed rows padded to a bounded set of sizes
        if keep is not None and not bool(keep.all()) and bool(keep.any()):
            h = self._encode_unpadded(h, keep, bucket)
        elif bucket and (keep is None or bool(keep.any())):  # no padding: B x S rows, packed to bucket them
            h = self._encode_unpadded(h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device), bucket)
        else:
            hq = None  # int8_dynamic: each layer hands the next its output quantized per token
            for layer in self.encoder.layer:
                h, hq = layer(h, keep, xq=hq)
        pooled = self.pooler(h) if self.pooler is not None else None
        return h, pooled

    def _encode_unpadded(self, h: Tensor, keep: Tensor, bucket: bool = False) -> Tensor:
        """Remove padding once, run every layer on packed tokens (varlen attention), pad once at
        the end: no layer spends work on padding. Rows whose position 0 is padding (left padding)
        carry that position along as a query over their real keys, as transformers computes it.
        Other padded positions come back as 0.

        bucket: the T + G packed rows grow to bucket_rows(T + G) with copies of real tokens, as
        extra sequences of at most max_seqlen tokens (their own varlen attention; outputs dropped),
        so a process that sees every batch shape runs a bounded set of GEMM shapes (oneDNN keeps
        one primitive per shape: fastlm/native_memory.py). Each real token's output is computed from
        its own sequence only, as without the extra rows."""
        B, S, C = h.shape
        idx, rows, cu, max_len, ghosts = _unpad(keep)
        T = idx.numel()
        x = h.reshape(B * S, C).index_select(0, idx)  # (T, C)
        G = 0 if ghosts is None else ghosts.src.shape[0]
        P = bucket_rows(T + G) - T - G if bucket else 0
        parts = [x]
        if P:  # P extra rows, copies of real tokens, after the real ones and before the ghosts
            parts.append(x.index_select(0, torch.arange(P, device=x.device) % T))  # (P, C)
            ends = cu.new_tensor([*range(T + max_len, T + P, max_len), T + P])  # sequences of <= max_len rows
            cu = torch.cat([cu, ends])
        if ghosts is not None:
            parts.append(h[rows, 0])  # (G, C): position 0 of the left-padded rows last
        x = torch.cat(parts) if len(parts) > 1 else x  # (T + P + G, C)
        xq = None
        for layer in self.encoder.layer:
            x, xq = layer(x, None, (cu, max_len), ghosts, xq)
        out = x.new_zeros(B * S, C).index_copy_(0, idx, x[:T]).view(B, S, C)  # (B, S, C)
        if ghosts is not None:
            out[rows, 0] = x[T + P:]
        return out

    # -- weights -------------------------------------------------------------------------
    @classmethod
    def hf_prefixes(cls) -> tuple[str, ...]:
        return (cls.family.prefix + ".",)

    @staticmethod
    def hf_ignored(key: str) -> bool:
        """Buffers, not weights."""
        return key.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))

    def weight_map(self, ours_prefix: str = "", with_pooler: bool = True) -> list[W]:
        """This encoder's parameters (names prefixed by ours_prefix) <- checkpoint names with the
        family's base prefix removed (the loader strips it)."""
        fam = self.family
        names = {n for n, _ in self.named_parameters()}
        m = []
        for ours, hf in fam.embeddings_map.items():
            for t in ("weight", "bias"):
                if f"embeddings.{ours}.{t}" in names:
                    m.append(W(f"{ours_prefix}embeddings.{ours}.{t}", (f"embeddings.{hf}.{t}",)))
        for i in range(len(self.encoder.layer)):
            p, q = f"encoder.layer.{i}.", f"{fam.layers}.{i}."
            for ours, hf in fam.layer_map.items():
                hfs = _pairs(hf)
                for t in ("weight", "bias"):
                    m.append(W(f"{ours_prefix}{p}{ours}.{t}", tuple(f"{q}{n}.{t}" for n in hfs),
                               "cat" if len(hfs) > 1 else "copy"))
        if with_pooler and self.pooler is not None:
            m += [W(f"{ours_prefix}pooler.dense.{t}", (f"pooler.dense.{t}",)) for t in ("weight", "bias")]
        return m

    def head_map(self) -> list[W]:
        return []

    def optional_hf(self) -> tuple[str, ...]:
        return ()


# -- heads -----------------------------------------------------------------------------------

def _same(*names: str) -> list[W]:
    """Head weights that keep their checkpoint names."""
    return [W(n, (n,)) for n in names]


def _lin(name: str) -> tuple[str, str]:
    return (f"{name}.weight", f"{name}.bias")


class BertPreTrainedHead(nn.Module):
    """A family's base model under its transformers attribute (`bert`, `roberta`, `distilbert`)
    plus a task head. Subclasses set `base` (the base model class) and build the head."""

    base = BertModel
    add_pooling_layer = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.add_module(self.base.family.prefix, self.base(config, add_pooling_layer=self.add_pooling_layer))

    @property
    def encoder_model(self) -> BertModel:
        return getattr(self, self.base.family.prefix)

    device = property(lambda self: self.encoder_model.device)
    dtype = property(lambda self: self.encoder_model.dtype)

    def init_random(self):
        init_weights(self, self.config.initializer_range)
        return self

    @classmethod
    def hf_prefixes(cls) -> tuple[str, ...]:
        return cls.base.hf_prefixes()

    hf_ignored = staticmethod(BertModel.hf_ignored)

    def weight_map(self) -> list[W]:
        base = self.encoder_model.weight_map(self.base.family.prefix + ".", with_pooler=False)
        return base + self.head_map()

    def head_map(self) -> list[W]:
        """Head weights: loaded when the checkpoint has them, else newly initialised (as
        transformers does, with a warning naming them)."""
        raise NotImplementedError

    def optional_hf(self) -> tuple[str, ...]:
        return ()

    def hidden(self, input_ids, attention_mask, token_type_ids) -> BaseModelOutput:
        return self.encoder_model(input_ids, attention_mask, token_type_ids)


class BertForSequenceClassification(BertPreTrainedHead):
    """forward(...) -> .logits (B, num_labels), from the pooled first token. num_labels (and
    id2label, problem_type) come from the config as in transformers; problem_type only changes
    transformers' loss, so logits are the same for regression / single- / multi-label."""

    add_pooling_layer = True

    def __init__(self, config):
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def head_map(self) -> list[W]:
        pooler = [W(f"bert.pooler.dense.{t}", (f"pooler.dense.{t}",)) for t in ("weight", "bias")]
        return pooler + _same(*_lin("classifier"))

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        pooled = self.hidden(input_ids, attention_mask, token_type_ids).pooler_output  # (B, C)
        return LogitsOutput(logits=linear(self.classifier, pooled))  # (B, num_labels)


class BertForTokenClassification(BertPreTrainedHead):
    """forward(...) -> .logits (B, S, num_labels)."""

    def __init__(self, config):
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def head_map(self) -> list[W]:
        return _same(*_lin("classifier"))

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        return LogitsOutput(logits=linear(self.classifier, h))  # (B, S, num_labels)


class BertForQuestionAnswering(BertPreTrainedHead):
    """forward(...) -> .start_logits, .end_logits, each (B, S)."""

    def __init__(self, config):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)

    def head_map(self) -> list[W]:
        return _same(*_lin("qa_outputs"))

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> QuestionAnsweringModelOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        start, end = linear(self.qa_outputs, h).split(1, dim=-1)  # 2 x (B, S, 1)
        return QuestionAnsweringModelOutput(start_logits=start.squeeze(-1).contiguous(),
                                            end_logits=end.squeeze(-1).contiguous())


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", True))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = activation_name("BERT", config.hidden_act)

    def forward(self, h: Tensor) -> Tensor:
        return _ln(self.LayerNorm, _act(self.activation, linear(self.dense, h)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return linear(self.decoder, self.transform(h)) + self.bias  # (B, S, vocab)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(BertPreTrainedHead):
    """forward(...) -> .logits (B, S, vocab). The decoder is tied to the word embeddings unless
    the config says tie_word_embeddings=False."""

    def __init__(self, config):
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)
        self.retie()

    def retie(self) -> None:
        if _tied(self.config):
            self.cls.predictions.decoder.weight = self.encoder_model.embeddings.word_embeddings.weight

    def head_map(self) -> list[W]:
        p = "cls.predictions."
        m = _same(*_lin(p + "transform.dense"), *_lin(p + "transform.LayerNorm"), p + "bias")
        return m if _tied(self.config) else m + _same(p + "decoder.weight")

    def optional_hf(self) -> tuple[str, ...]:
        # tied to the word embeddings; decoder.bias is the same tensor as predictions.bias
        return ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> LogitsOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, S, C)
        return LogitsOutput(logits=self.cls.predictions(h))
