"""GPT-2 with a language-model head, on fastlm.ops. Names follow transformers' GPT-2
(wte, wpe, h.N.ln_1, h.N.attn.c_attn, ...), so the weight map is short; Conv1D weights
are stored transposed, in nn.Linear layout, which is what the kernels read."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlm import _ext, backend, ops
from fastlm.backend import model_entry
from fastlm.cache import StaticKVCache
from fastlm.linear import Int8Linear, PackedLinear, share_arena_
from fastlm.models.common import (
    BaseModelOutput,
    CausalLMOutput,
    LogitsOutput,
    W,
    activation_name,
    check_ids,
    decode_layout_,
    ffn,
    init_weights,
    linear,
)
from fastlm.models.outputs import hf_forward


@dataclass
class KVStep:
    """What one layer needs to use the static cache: prefill when `pos` is None, else decode one
    token per sequence at row pos[b] and attend to the first lens[b] = pos[b] + 1 rows."""

    cache: StaticKVCache
    layer: int
    pos: Tensor | None = None
    lens: Tensor | None = None
    kv_len: int | None = None  # host-known bound on lens, for the eager path (exact for B == 1)
    start: int = 0  # prefill: the block's first cache row (> 0 for a later chunk of a prompt)


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d = config.n_embd
        if d % config.n_head:
            raise ValueError(f"GPT2: n_embd {d} is not divisible by n_head {config.n_head}")
        self.n_head, self.head_dim = config.n_head, d // config.n_head
        self.c_attn = nn.Linear(d, 3 * d)  # fused QKV: rows [q; k; v]
        self.c_proj = nn.Linear(d, d)
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.scale = scale

    @model_entry  # inside a model: head dims the kernels do not cover run the reference (one log line)
    def forward(self, x: Tensor, key_padding_mask: Tensor | None, kv: KVStep | None = None) -> Tensor:
        B, S, C = x.shape
        qkv = linear(self.c_attn, x).view(B, S, 3, self.n_head, self.head_dim)  # (B, S, 3, H, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, H, S, D), strided views
        if kv is not None and kv.pos is not None and kv.kv_len is not None and B == 1:
            # eager decode of one sequence: its length is the host-known kv_len, so the new row is
            # written in place and attention reads exactly the rows in use, with no mask to build
            kc, vc = kv.cache.k[kv.layer, :1], kv.cache.v[kv.layer, :1]  # (1, H, capacity, D)
            kc[:, :, kv.kv_len - 1].copy_(k[:, :, 0])
            vc[:, :, kv.kv_len - 1].copy_(v[:, :, 0])
            y = ops.attention(q, kc[:, :, : kv.kv_len], vc[:, :, : kv.kv_len], scale=self.scale)  # (1, H, 1, D)
        elif kv is not None and kv.pos is not None:  # decode: one token per sequence
            kv.cache.append(kv.layer, k, v, kv.pos)
            kc, vc = kv.cache.k[kv.layer], kv.cache.v[kv.layer]  # (B, H, capacity, D)
            if kv.kv_len is not None:  # eager path: read only the rows in use
                kc, vc = kc[:, :, : kv.kv_len], vc[:, :, : kv.kv_len]
            y = ops.decode_attention_checked(q, kc, vc, kv.lens, self.scale)  # (B, H, 1, D); lens in range
        elif kv is not None and kv.start:  # a later chunk of a prompt: rows [start, start + S), attending to all before
            end = kv.start + S
            kc, vc = kv.cache.k[kv.layer, :B], kv.cache.v[kv.layer, :B]  # (B, H, capacity, D)
            kc[:, :, kv.start:end].copy_(k)
            vc[:, :, kv.start:end].copy_(v)
            y = ops.attention(q, kc[:, :, :end], vc[:, :, :end], causal=True, scale=self.scale)  # block at the end
        else:
            if kv is not None:  # prefill: the prompt's keys and values go into rows [0, S)
                kv.cache.prefill(kv.layer, k, v)
            y = ops.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=self.scale)
        if y.device.type == "cpu" and S > 1 and y.is_contiguous():  # (B, H, S, D) -> (B, S, H*D), no OpenMP region
            y = _ext.copy_rows_(y.new_empty(B, S, self.n_head, self.head_dim), y.transpose(1, 2)).view(B, S, C)
        else:
            y = y.transpose(1, 2).reshape(B, S, C)  # (B, S, H*D)
        return linear(self.c_proj, y)


class GPT2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, d_ff = config.n_embd, config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(d, d_ff)
        self.c_proj = nn.Linear(d_ff, d)
        self.activation = activation_name("GPT2", config.activation_function)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return ffn(self.c_fc, self.c_proj, x, self.activation, residual)  # residual + mlp(x)


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, h: Tensor, key_padding_mask: Tensor | None, kv: KVStep | None = None) -> Tensor:
        a = self.attn(ops.layer_norm(h, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps), key_padding_mask, kv)
        x, h = ops.layer_norm(a, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps, residual=h)  # ln_2(h + a), h + a
        return self.mlp(x, residual=h)


class GPT2Model(nn.Module):
    """transformers' GPT2Model for inference: forward(input_ids, attention_mask, position_ids)
    -> .last_hidden_state (B, S, C) (after ln_f). Padded positions hold whatever their query
    computes over the real keys it may see (0 where it sees none); transformers' values there
    are not defined by the model either."""

    model_type = "gpt2"

    def __init__(self, config):
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError(f"{type(self).__name__}: add_cross_attention=True is not supported")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def init_random(self):
        init_weights(self, self.config.initializer_range)
        return self

    @property
    def device(self) -> torch.device:
        return self.wpe.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wpe.weight.dtype

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, S); attention_mask (B, S) with 1 = token, 0 = padding; position_ids
        (B, S) default 0..S-1 as in transformers' forward. Returns ln_f(h) (B, S, C)."""
        cfg, name = self.config, type(self).__name__
        check_ids(name, input_ids, cfg.vocab_size, cfg.n_positions, attention_mask, position_ids=position_ids)
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)[None]  # (1, S)
        kpm = None if attention_mask is None else attention_mask.to(device=self.device, dtype=torch.bool)
        h = self.wte(input_ids) + self.wpe(position_ids)  # (B, S, C)
        for block in self.h:
            h = block(h, kpm)
        return ops.layer_norm(h, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.hidden_states(input_ids, attention_mask, position_ids))

    @staticmethod
    def hf_prefixes() -> tuple[str, ...]:
        return ("transformer.",)

    @staticmethod
    def hf_ignored(key: str) -> bool:
        """Checkpoint entries that are not weights (old causal-mask buffers)."""
        return key.endswith((".attn.bias", ".attn.masked_bias"))

    def weight_map(self) -> list[W]:
        T = "transpose"  # transformers' Conv1D keeps [in, out]; we keep nn.Linear's [out, in]
        m = [W("wte.weight", ("wte.weight",)), W("wpe.weight", ("wpe.weight",))]
        for i in range(self.config.n_layer):
            p = f"h.{i}."
            m += [
                W(p + "ln_1.weight", (p + "ln_1.weight",)),
                W(p + "ln_1.bias", (p + "ln_1.bias",)),
                W(p + "attn.c_attn.weight", (p + "attn.c_attn.weight",), T),
                W(p + "attn.c_attn.bias", (p + "attn.c_attn.bias",)),
                W(p + "attn.c_proj.weight", (p + "attn.c_proj.weight",), T),
                W(p + "attn.c_proj.bias", (p + "attn.c_proj.bias",)),
                W(p + "ln_2.weight", (p + "ln_2.weight",)),
                W(p + "ln_2.bias", (p + "ln_2.bias",)),
                W(p + "mlp.c_fc.weight", (p + "mlp.c_fc.weight",), T),
                W(p + "mlp.c_fc.bias", (p + "mlp.c_fc.bias",)),
                W(p + "mlp.c_proj.weight", (p + "mlp.c_proj.weight",), T),
                W(p + "mlp.c_proj.bias", (p + "mlp.c_proj.bias",)),
            ]
        m += [W("ln_f.weight", ("ln_f.weight",)), W("ln_f.bias", ("ln_f.bias",))]
        return m + self.head_map()

    def head_map(self) -> list[W]:
        """Head weights: newly initialised when the checkpoint lacks them (as transformers)."""
        return []

    def optional_hf(self) -> tuple[str, ...]:
        return ()


class GPT2ForSequenceClassification(GPT2Model):
    """transformers' GPT2ForSequenceClassification: forward(...) -> .logits (B, num_labels), the
    score of the last token whose id is not config.pad_token_id (transformers' rule: the rightmost
    such token, so left and right padding both work; -1 when pad_token_id is None, which transformers
    allows for batch size 1 only)."""

    def __init__(self, config):
        super().__init__(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)

    def head_map(self) -> list[W]:
        return [W("score.weight", ("score.weight",))]

    @hf_forward
    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> LogitsOutput:
        h = self.hidden_states(input_ids, attention_mask, position_ids)  # (B, S, C); checks the inputs
        B, pad = input_ids.shape[0], self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("GPT2ForSequenceClassification: batch sizes > 1 need config.pad_token_id "
                             "(the last non-padding token is found by it), as in transformers")
        if pad is None:
            last = torch.full((B,), input_ids.shape[1] - 1, device=h.device)
        else:
            non_pad = (input_ids != pad).to(h.device, torch.int32)  # (B, S)
            last = (torch.arange(input_ids.shape[1], device=h.device, dtype=torch.int32) * non_pad).argmax(-1)
        pooled = h[torch.arange(B, device=h.device), last]  # (B, C)
        return LogitsOutput(logits=linear(self.score, pooled))  # (B, num_labels)


class GPT2LMHeadModel(GPT2Model):
    """transformers' GPT2LMHeadModel for inference: forward(input_ids, attention_mask) -> .logits."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))  # lm_head shares wte's weight
        if self.tied:
            self.lm_head.weight = self.wte.weight

    def init_random(self) -> GPT2LMHeadModel:
        self.decode_layout_(pack=False)  # plain nn.Linear (head tied to wte) while initialising
        init_weights(self, self.config.initializer_range)
        self.decode_layout_()
        return self

    def untie_(self) -> None:
        """Give lm_head its own weight (uninitialised, same shape): for a tied config whose
        checkpoint stores a different lm_head.weight, which transformers then uses."""
        self.tied = False
        w = self.wte.weight
        self.lm_head.weight = nn.Parameter(torch.empty_like(w, device=w.device), requires_grad=w.requires_grad)

    @hf_forward
    @torch.inference_mode()
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> CausalLMOutput:
        """input_ids (B, S); attention_mask (B, S) with 1 = token, 0 = padding; position_ids
        (B, S) default 0..S-1 as in transformers' forward. Returns .logits (B, S, vocab)."""
        h = self.hidden_states(input_ids, attention_mask, position_ids)  # (B, S, C)
        return CausalLMOutput(logits=linear(self.lm_head, h))  # (B, S, vocab)

    # -- cached inference (fastlm.generation drives these) ---------------------------------
    def prefill(self, input_ids: Tensor, key_padding_mask: Tensor | None, cache: StaticKVCache,
                last_only: bool = False) -> Tensor:
        """Left-aligned prompts (B, T) (padding only at the end) -> logits (B, T, vocab); their
        keys and values fill cache rows [0, T). last_only: the logits of position T - 1 alone,
        (B, 1, vocab) (unpadded prompts: what sampling the next token needs; the LM head over the
        other T - 1 positions is about a third of a 128-token GPT-2 small prefill)."""
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        h = self.wte(input_ids) + self.wpe(pos)  # (B, T, C)
        with _ext.pool_scope(self._pool_gemms(h)):
            for i, block in enumerate(self.h):
                h = block(h, key_padding_mask, KVStep(cache, i))
            if last_only:
                h = h[:, -1:]
            h = ops.layer_norm(h, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
            return linear(self.lm_head, h)

    def _pool_gemms(self, h: Tensor) -> bool:
        """Whether the blocks' GEMMs on `h` run on fastlm's CPU pool (packed fp32 / bf16 panels or
        int8 weight-only panels on CPU): then the LayerNorms between them share rows through the same
        pool (fastlm._ext.pool_scope), with no OpenMP region left spinning between two pool jobs."""
        lin = self.h[0].attn.c_attn
        return h.device.type == "cpu" and (
            isinstance(lin, Int8Linear) or (isinstance(lin, PackedLinear) and lin.packed is not None))

    def prefill_chunk(self, input_ids: Tensor, start: int, cache: StaticKVCache, last_only: bool = False) -> Tensor:
        """A later block of unpadded prompts (chunked prefill): input_ids (B, T) are the tokens at
        positions [start, start + T), whose earlier rows [0, start) are in the cache already ->
        logits (B, T, vocab); their keys and values fill cache rows [start, start + T). prefill(ids[:, :s])
        then prefill_chunk(ids[:, s:], s) gives prefill(ids)'s logits and cache rows. start 0 is prefill.
        last_only: the logits of the chunk's last position alone, (B, 1, vocab).
        Raises ValueError when start + T passes the model's positions or the cache's capacity."""
        B, T = input_ids.shape
        end = start + T
        if start < 0 or end > min(self.config.n_positions, cache.capacity):
            raise ValueError(f"prefill_chunk: rows [{start}, {end}) must lie within the model's "
                             f"{self.config.n_positions} positions and the cache's {cache.capacity} rows")
        if start == 0:
            return self.prefill(input_ids, None, cache, last_only)
        pos = torch.arange(start, end, device=input_ids.device)[None]  # (1, T)
        h = self.wte(input_ids) + self.wpe(pos)  # (B, T, C)
        with _ext.pool_scope(self._pool_gemms(h)):
            for i, block in enumerate(self.h):
                h = block(h, None, KVStep(cache, i, start=start))
            if last_only:
                h = h[:, -1:]
            h = ops.layer_norm(h, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
            return linear(self.lm_head, h)

    def decode_step(self, tokens: Tensor, pos: Tensor, cache: StaticKVCache, kv_len: int | None = None) -> Tensor:
        """One token per sequence, tokens (B,) at positions pos (B,) int32 -> logits (B, vocab).
        Sequence b is cache batch row b: its key and value are written at row pos[b] and it attends
        to its own pos[b] + 1 rows (ragged lengths). Static shapes and no host sync: this is what
        the CUDA graph captures. kv_len (eager path): a host-known bound on pos + 1 (every
        pos[b] < kv_len); with one sequence (B == 1) it must equal pos + 1, as fastlm.generation
        passes it. On CPU in float32 with packed projections the whole step is one C++ call:
        gpt2_decode_cpu for B == 1 with kv_len, gpt2_decode_batch_cpu (csrc/decode_batch_cpu.cpp)
        otherwise (kv_len None: the cache capacity bounds pos); a pos outside [0, kv_len) there
        raises ValueError naming it. In bfloat16 (bf16 panels and cache) B == 1 with kv_len is one
        call too (gpt2_decode_cpu_bf16); a bf16 batch runs op by op."""
        lens = pos + 1  # (B,) int32: rows each sequence attends to, the new one included
        h = self.wte(tokens)[:, None] + self.wpe(pos)[:, None]  # (B, 1, C)
        if h.device.type == "cpu":
            params = self._cpu_decode_params(h, cache)
            if params is not None and kv_len is not None and tokens.shape[0] == 1:
                # one sequence on CPU: the whole step in one C++ call
                op = (torch.ops.fastlm.gpt2_decode_cpu_bf16 if cache.k.dtype == torch.bfloat16
                      else torch.ops.fastlm.gpt2_decode_cpu)  # bf16: float32 logits, see csrc/decode_bf16.cpp
                return op(h, params, cache.k, cache.v, kv_len, self._attn_scales, self.config.vocab_size,
                          self.ln_f.eps, self.h[0].mlp.activation)  # (1, vocab)
            if params is not None and cache.k.dtype == torch.float32:
                # a batch (ragged positions) on CPU: one C++ call, each panel read once (float32 /
                # int8 panels; a bf16 batch runs op by op)
                return torch.ops.fastlm.gpt2_decode_batch_cpu(
                    h, params, cache.k, cache.v, pos, cache.capacity if kv_len is None else kv_len,
                    self._attn_scales, self.config.vocab_size, self.ln_f.eps, self.h[0].mlp.activation)  # (B, vocab)
        for i, block in enumerate(self.h):
            h = block(h, None, KVStep(cache, i, pos, lens, kv_len))
        h = ops.layer_norm(h, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
        return linear(self.lm_head, h[:, 0])  # (B, vocab)

    def _cpu_decode_params(self, h: Tensor, cache: StaticKVCache) -> list[Tensor | None] | None:
        """The flat parameter list of torch.ops.fastlm.gpt2_decode_cpu (see csrc/decode_cpu.cpp),
        or of its bfloat16 twin gpt2_decode_cpu_bf16 (csrc/decode_bf16.cpp) for a bf16 cache, whose
        projections are all bf16 PackedLinear pair panels; None when this step cannot run there: not
        CPU float32 / bfloat16, fastlm._C missing, a projection not in packed CPU panels of the
        cache's dtype (PackedLinear / Int8Linear for float32), a LayerNorm that is not a plain
        nn.LayerNorm with weight, bias and ln_f's eps (the op takes one eps), layers with different
        activations, or a backend other than auto / cuda asked for (use_backend("torch") /
        ("triton") run the step op by op on those). Sets self._attn_scales. Gathered afresh every
        step from the modules' own parameter and buffer dicts (no Module.__getattr__), so a swapped
        module, a reassigned bias or a changed attention scale is read at once: a list cached by the
        weights alone kept the old LayerNorms and biases."""
        dt = cache.k.dtype
        if h.device.type != "cpu" or h.dtype != dt or dt not in (torch.float32, torch.bfloat16):
            return None
        if backend.current() not in ("auto", "cuda") or not _ext.available():
            return None
        ln_f = self._modules["ln_f"]
        eps = getattr(ln_f, "eps", None)
        act = self.h[0].mlp.activation
        params: list[Tensor | None] = []
        scales = []
        for b in self._modules["h"]:
            m = b._modules
            attn, mlp = m["attn"], m["mlp"]
            am, mm = attn._modules, mlp._modules
            ln1, ln2 = _cpu_ln(m["ln_1"], eps), _cpu_ln(m["ln_2"], eps)
            qkv, o = _cpu_proj(am["c_attn"]), _cpu_proj(am["c_proj"])
            fc, pr = _cpu_proj(mm["c_fc"]), _cpu_proj(mm["c_proj"])
            if None in (ln1, ln2, qkv, o, fc, pr) or mlp.activation != act:
                return None
            if any((p[0].dtype == torch.bfloat16) != (dt == torch.bfloat16) for p in (qkv, o, fc, pr)):
                return None
            params += [*ln1, *qkv, *o, *ln2, *fc, *pr]
            scales.append(float(attn.scale))
        lnf, head = _cpu_ln(ln_f, eps), _cpu_proj(self._modules["lm_head"])
        if lnf is None or head is None or (head[0].dtype == torch.bfloat16) != (dt == torch.bfloat16):
            return None
        self._attn_scales = scales
        return params + [*lnf, *head]

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Greedy or sampled generation; see fastlm.generation.generate. Returns (B, S + new)."""
        from fastlm.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Iterator[Tensor]:
        """Yields each step's new tokens (B,) as they come; see fastlm.generation.stream."""
        from fastlm.generation import stream

        return stream(self, input_ids, attention_mask, **kwargs)

    # -- weights -------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        """After .to() / .cuda() / .half(): the decode projections take their device's layout."""
        out = super()._apply(fn, *args, **kwargs)
        self.decode_layout_()
        return out

    def projections(self) -> list[tuple[nn.Module, str]]:
        """(parent, name) of every projection a decode step reads, the LM head last: what
        fastlm.quantize_ swaps and decode_layout_ packs."""
        slots = [(m, n) for b in self.h for m, n in ((b.attn, "c_attn"), (b.attn, "c_proj"), (b.mlp, "c_fc"),
                                                     (b.mlp, "c_proj"))]
        return slots + [(self, "lm_head")]

    def decode_linears(self) -> list[nn.Module]:
        """The projections every decode step reads, the LM head included."""
        return [getattr(m, n) for m, n in self.projections()]

    def tied_embedding_slot(self):
        """(parent, name, head getter) of the embedding tied to the LM head, for fastlm.quantize_."""
        return (self, "wte", lambda: self.lm_head) if self.tied else None

    def decode_layout_(self, pack: bool | None = None) -> None:
        """Lay the decode projections out for this device: on CPU in float32 or bfloat16 (with
        fastlm._C) each becomes a PackedLinear, the panels the CPU GEMV streams (fp32 panels or bf16
        pair panels; the tied head gets its own packed copy; the embedding keeps wte; bf16 panels all
        live in one huge-page arena, in the order a step reads them: fastlm.linear.share_arena_). Elsewhere they
        are plain nn.Linear again (the tied head shares wte) in the layout of common.decode_layout_.
        Quantized projections lay themselves out."""
        if any(p.is_meta for p in self.wpe.parameters()):
            return
        packed = (self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16) and _ext.available()
                  and pack is not False)
        with torch.no_grad():
            for parent, name in self.projections():
                lin = getattr(parent, name)
                if packed and type(lin) is nn.Linear:
                    setattr(parent, name, PackedLinear.from_linear(lin))
                elif not packed and isinstance(lin, PackedLinear):
                    tied = parent is self and name == "lm_head" and self.tied and isinstance(self.wte, nn.Embedding)
                    plain = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      device=self.device, dtype=self.dtype)
                    plain.weight = self.wte.weight if tied else nn.Parameter(lin.dense_weight(), requires_grad=False)
                    if lin.bias is not None:
                        plain.bias = nn.Parameter(lin.bias, requires_grad=False)
                    setattr(parent, name, plain)
            if packed and self.dtype == torch.bfloat16:  # bf16 pair panels: one run of memory per model
                share_arena_([lin for lin in self.decode_linears() if isinstance(lin, PackedLinear)])
        decode_layout_([lin for lin in self.decode_linears()[:-1] if type(lin) is nn.Linear])  # the head stays tied

    def weight_map(self) -> list[W]:
        m = super().weight_map()
        if not self.tied:
            m.append(W("lm_head.weight", ("lm_head.weight",)))
        return m

    def optional_hf(self) -> tuple[str, ...]:
        """Checkpoint entries that may be present and are not needed (the tied head)."""
        return ("lm_head.weight",) if self.tied else ()


def _cpu_ln(ln: nn.Module, eps: float | None) -> tuple[Tensor, Tensor] | None:
    """(weight, bias) of a LayerNorm torch.ops.fastlm.gpt2_decode_cpu can run (plain nn.LayerNorm,
    affine with a bias, eps equal to `eps`), else None."""
    if type(ln) is not nn.LayerNorm or ln.eps != eps:
        return None
    p = ln._parameters
    w, b = p.get("weight"), p.get("bias")
    return None if w is None or b is None else (w, b)


def _cpu_proj(lin: nn.Module) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """(panels, int8 scale or None, bias) of a projection in packed CPU panels, else None."""
    t = type(lin)
    if t is PackedLinear:
        bufs = lin._buffers
        w = bufs["packed"]
        return None if w is None else (w, None, bufs["bias"])
    if t is Int8Linear:
        bufs = lin._buffers
        w = bufs["qweight"]
        return (w, bufs["scale"], bufs["bias"]) if w.dim() == 3 else None
    return None
