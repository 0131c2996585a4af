"""Generation for fastlm.GPT2LMHeadModel: prefill through the fused attention into a static KV
cache, then one static-shape decode step per token, replayed from a CUDA graph on GPU (run
eagerly on CPU), with sampling on the device.

Prompts of different lengths may be padded on either side (attention_mask says which tokens are
real): they are left-aligned once, so sequence b's tokens sit at positions 0..len_b-1, exactly the
positions transformers gives a left-padded prompt. Each sequence then decodes at its own position.
The only host syncs in the loop are the stop check every `check_every` tokens and streaming.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fastlm import _ext
from fastlm.cache import StaticKVCache
from fastlm.models.common import check_ids

log = logging.getLogger("fastlm")
CAPACITY_BUCKET = 256  # cache rows are rounded up to this, so nearby lengths share a cache + graph
KEEP_DECODERS = 2  # decoders (cache + graph) kept per model


def batch_bucket(model, batch: int) -> int:
    """Rows of the static decode buffers: with CUDA graphs (or FASTLM_BATCH_BUCKETS=1) the next
    power of two, so batch sizes 5..8 share one captured graph; eager CPU decoding uses the batch
    itself (padding rows would be real work there)."""
    graphs = model.device.type == "cuda" and os.environ.get("FASTLM_CUDA_GRAPHS", "1") != "0"
    if graphs or os.environ.get("FASTLM_BATCH_BUCKETS", "0") == "1":
        return 1 << (batch - 1).bit_length()
    return batch


# transformers' GenerationConfig._get_default_generation_params() for the fields fastlm reads: what
# transformers 5 fills in at generate time for a field that neither the call nor the model's
# generation config sets (tests/test_generation_defaults.py checks them against the installed transformers).
DEFAULTS = {"max_length": 20, "min_length": 0, "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50,
            "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "remove_invalid_values": False,
            "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_return_sequences": 1, "output_scores": False,
            "return_dict_in_generate": False, "num_beam_groups": 1}

# generate arguments fastlm implements (each gives transformers' tokens), besides seed / generation_config
SUPPORTED = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
             "top_p", "min_p", "eos_token_id", "pad_token_id", "repetition_penalty", "encoder_repetition_penalty",
             "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
             "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
             "begin_suppress_tokens", "renormalize_logits")

# transformers generate options that change no token of greedy / multinomial sampling with one beam
# (beam-only, assistant-only, cache and compilation settings): accepted and ignored, as transformers does
IGNORED = ("use_cache", "cache_implementation", "cache_config", "max_cache_len", "early_stopping", "length_penalty",
           "diversity_penalty", "low_memory", "bos_token_id", "decoder_start_token_id", "is_assistant",
           "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
           "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "speculation_type",
           "max_matching_ngram_size", "compile_config", "disable_compile", "prefill_chunk_size", "tokenizer",
           "trust_remote_code")


def _on(v) -> bool:
    return v is not None and v is not False


# transformers generate options fastlm does not implement: name -> does it take effect in transformers?
# (given the value and whether it samples). One that takes effect raises ValueError naming it.
REFUSED = {
    "num_beams": lambda v, smp: v is not None and v != 1,
    "num_beam_groups": lambda v, smp: v is not None and v != 1,
    "penalty_alpha": lambda v, smp: v is not None and v > 0 and not smp,  # contrastive search
    "constraints": lambda v, smp: v is not None,
    "force_words_ids": lambda v, smp: v is not None,
    "dola_layers": lambda v, smp: v is not None,
    "num_return_sequences": lambda v, smp: v is not None and v != 1,
    "typical_p": lambda v, smp: smp and v is not None and v < 1.0,
    "epsilon_cutoff": lambda v, smp: smp and v is not None and 0.0 < v < 1.0,
    "eta_cutoff": lambda v, smp: smp and v is not None and 0.0 < v < 1.0,
    "top_h": lambda v, smp: smp and v is not None,
    "guidance_scale": lambda v, smp: v is not None and v != 1,
    "encoder_no_repeat_ngram_size": lambda v, smp: v is not None and v > 0,
    "watermarking_config": lambda v, smp: v is not None,
    "stop_strings": lambda v, smp: v is not None,
    "max_time": lambda v, smp: v is not None,
    "prompt_lookup_num_tokens": lambda v, smp: v is not None,
    "assistant_early_exit": lambda v, smp: v is not None,
    "use_mtp": lambda v, smp: _on(v),
    "token_healing": lambda v, smp: _on(v),
    "output_scores": lambda v, smp: _on(v),
    "output_logits": lambda v, smp: _on(v),
    "output_attentions": lambda v, smp: _on(v),
    "output_hidden_states": lambda v, smp: _on(v),
    "return_dict_in_generate": lambda v, smp: _on(v),
    # generate() arguments that are no GenerationConfig fields
    "logits_processor": lambda v, smp: v is not None and len(v) > 0,
    "stopping_criteria": lambda v, smp: v is not None and len(v) > 0,
    "prefix_allowed_tokens_fn": lambda v, smp: v is not None,
    "assistant_model": lambda v, smp: v is not None,
    "streamer": lambda v, smp: v is not None,
    "negative_prompt_ids": lambda v, smp: v is not None,
    "negative_prompt_attention_mask": lambda v, smp: v is not None,
    "custom_generate": lambda v, smp: v is not None,
    "synced_gpus": lambda v, smp: _on(v),
}
CALL_ONLY = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
             "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "synced_gpus")


@dataclass(frozen=True)
class Settings:
    """Generation arguments of one call after resolution (see `resolve`), in the form the decode loop
    uses: token-id lists as tuples, lengths as counts of new tokens."""

    max_new_tokens: int
    prompt_len: int = 1  # input_ids.shape[1], padding included: transformers' lengths count it
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    eos_token_id: tuple[int, ...] = ()  # empty: no end-of-sequence stop
    pad_token_id: int | None = None  # for finished sequences; default: the first eos id
    min_new_tokens: int = 0  # the eos ids are at -inf while fewer new tokens than this exist
    repetition_penalty: float = 1.0
    encoder_repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # without single-token eos entries, as transformers drops them
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    remove_invalid_values: bool = False
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    begin_suppress_step: int = 0
    renormalize_logits: bool = False


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _ids(name: str, v, vocab: int, *, lo: int = 1) -> tuple[int, ...]:
    """A list (or tuple) of token ids in [0, vocab), at least `lo` of them."""
    if not isinstance(v, (list, tuple)) or len(v) < lo or not all(_int(t) and 0 <= t < vocab for t in v):
        raise ValueError(f"generate: {name} must be a list of token ids in [0, {vocab}), got {v!r}")
    return tuple(int(t) for t in v)


def resolve(model, prompt_len: int, generation_config=None, **explicit) -> Settings:
    """Settings for one call, resolved as transformers.GenerationMixin.generate resolves them: each
    argument given (not None) wins; else `generation_config` (a transformers GenerationConfig passed to
    the call); else the model's `generation_config` (fastlm.from_pretrained attaches the checkpoint's;
    a model without one reads the same names from its config); else transformers' defaults
    (`DEFAULTS`: top_k 50, max_length 20, ...).

    Lengths count as transformers counts them, the padded prompt (`prompt_len` = input_ids.shape[1])
    included: max_new_tokens wins; else max_length (prompt included) sets max_length - prompt_len new
    tokens; else 20 new tokens, capped at the model's positions. min_new_tokens wins over min_length
    (prompt included). An option fastlm does not implement (`REFUSED`) raises ValueError naming it when
    it would change transformers' tokens; one that changes none (`IGNORED`) is accepted; any other
    unknown name raises TypeError. Bad values raise ValueError / TypeError naming the argument,
    before any work."""
    name = "generate"
    known = set(SUPPORTED) | set(REFUSED) | set(IGNORED)
    unknown = sorted(k for k in explicit if k not in known)
    if unknown:
        raise TypeError(f"{name}: unexpected keyword argument {unknown[0]!r} (supported: {', '.join(SUPPORTED)}, "
                        "seed, generation_config)")
    if generation_config is not None and not hasattr(generation_config, "to_dict"):
        raise TypeError(f"{name}: generation_config must be a transformers GenerationConfig, "
                        f"got {type(generation_config).__name__}")
    base = getattr(model, "generation_config", None)
    if base is None:
        base = model.config
    layers = [x for x in (generation_config, base) if x is not None]

    def get(f, default=True):
        """(value, given in the call) for field f: the call, its generation_config, the model's, the default."""
        v = explicit.get(f)
        if v is not None:
            return v, True
        for i, layer in enumerate(layers):
            v = getattr(layer, f, None)
            if v is not None:
                return v, i == 0 and generation_config is not None
        return (DEFAULTS.get(f) if default else None), False

    vocab, n_pos, S = model.config.vocab_size, model.config.n_positions, prompt_len
    do_sample = bool(get("do_sample")[0])
    top_k = get("top_k")[0]
    for f, takes_effect in REFUSED.items():
        v = explicit.get(f) if f in CALL_ONLY else get(f)[0]
        try:
            on = takes_effect(v, do_sample) and not (f == "penalty_alpha" and not (_int(top_k) and top_k > 1))
        except TypeError:  # a value of the wrong type: not a default either
            on = True
        if on:
            raise ValueError(f"{name}: {f}={v!r} is not supported by fastlm (transformers' greedy search and "
                             "multinomial sampling with one beam are); leave it unset")

    # lengths (transformers' _prepare_generated_length)
    n, _ = get("max_new_tokens")
    max_length, _ = get("max_length", default=False)
    if max_length is not None and (not _int(max_length) or max_length < 1):
        raise ValueError(f"{name}: max_length must be an int >= 1 (the prompt included), got {max_length!r}")
    if n is not None:
        if not _int(n) or n < 1:
            raise ValueError(f"{name}: max_new_tokens must be an int >= 1, got {n!r}")
    elif max_length is not None:
        if max_length <= S:
            raise ValueError(f"{name}: max_length ({max_length}) counts the prompt ({S} tokens, padding included) "
                             "and leaves no new token; set max_new_tokens or a larger max_length")
        n = max_length - S
    else:  # transformers: "by default let's always generate 20 new tokens", within the positions
        n = min(DEFAULTS["max_length"] + S, n_pos) - S
        if n < 1:
            raise ValueError(f"{name}: the prompt ({S} tokens) fills the model's {n_pos} positions: no room for "
                             "new tokens")
    min_new, _ = get("min_new_tokens")
    min_length, _ = get("min_length")
    if not _int(min_length) or min_length < 0:
        raise ValueError(f"{name}: min_length must be an int >= 0 (the prompt included), got {min_length!r}")
    if min_new is not None:
        if not _int(min_new) or min_new < 0:
            raise ValueError(f"{name}: min_new_tokens must be an int >= 0, got {min_new!r}")
    else:
        min_new = max(0, min_length - S)

    # special tokens (transformers' _prepare_special_tokens)
    eos_given, eos_explicit = get("eos_token_id")
    eos = () if eos_given is None else (eos_given,) if _int(eos_given) else eos_given
    limit = vocab if eos_explicit else float("inf")
    if not isinstance(eos, (list, tuple)) or not all(_int(e) and 0 <= e < limit for e in eos):
        raise ValueError(f"{name}: eos_token_id must be a token id in [0, {vocab}) or a list of them, "
                         f"got {eos_given!r}")
    eos = tuple(int(e) for e in eos)
    if not eos_explicit:  # from the checkpoint: ids past the vocabulary never come
        eos = tuple(e for e in eos if e < vocab)
    pad, _ = get("pad_token_id")
    if pad is None and eos:
        pad = eos[0]  # as transformers does when a model has no pad token
    if pad is not None and (not _int(pad) or pad < 0):
        raise ValueError(f"{name}: pad_token_id must be an int >= 0, got {pad!r}")

    # sampling (checked only when sampling: greedy search never reads them, as in transformers)
    t, top_p, min_p = get("temperature")[0], get("top_p")[0], get("min_p")[0]
    if do_sample:
        if not _num(t) or not 0 < t < float("inf"):
            raise ValueError(f"{name}: temperature must be > 0 and finite when sampling, got {t!r}")
        if not _int(top_k) or top_k < 0:
            raise ValueError(f"{name}: top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not _num(top_p) or not 0 <= top_p <= 1:
            raise ValueError(f"{name}: top_p must lie in [0, 1], got {top_p!r}")
        if min_p is not None and (not _num(min_p) or not 0 <= min_p <= 1):
            raise ValueError(f"{name}: min_p must lie in [0, 1], got {min_p!r}")

    out = {"max_new_tokens": n, "prompt_len": S, "do_sample": do_sample, "eos_token_id": eos, "pad_token_id": pad,
           "min_new_tokens": min_new, "temperature": float(t) if _num(t) else 1.0,
           "top_k": top_k if _int(top_k) else 0, "top_p": float(top_p) if _num(top_p) else 1.0,
           "min_p": float(min_p) if do_sample and min_p is not None else None}
    for f in ("repetition_penalty", "encoder_repetition_penalty"):
        r = get(f)[0]
        if not _num(r) or not 0 < r < float("inf"):
            raise ValueError(f"{name}: {f} must be a finite float > 0 (1.0 = off), got {r!r}")
        out[f] = float(r)
    ngram = get("no_repeat_ngram_size")[0]
    if not _int(ngram) or ngram < 0:
        raise ValueError(f"{name}: no_repeat_ngram_size must be an int >= 0 (0 = off), got {ngram!r}")
    out["no_repeat_ngram_size"] = ngram

    bias = get("sequence_bias")[0]
    if bias is not None:
        what = (f"{name}: sequence_bias must be a non-empty dict {{(token ids...): float bias}} or a list of "
                f"[[token ids...], float bias], with ids in [0, {vocab}), got {bias!r}")
        pairs = list(bias.items()) if isinstance(bias, dict) else bias
        if not isinstance(pairs, (list, tuple)) or not pairs or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and _num(p[1]) for p in pairs):
            raise ValueError(what)
        try:
            merged = {_ids("sequence_bias", seq, vocab): float(b) for seq, b in pairs}
        except ValueError:
            raise ValueError(what) from None
        out["sequence_bias"] = tuple(merged.items())
    bad = get("bad_words_ids")[0]
    if bad is not None:
        if not isinstance(bad, (list, tuple)) or not bad:
            raise ValueError(f"{name}: bad_words_ids must be a non-empty list of lists of token ids, got {bad!r}")
        words = tuple(_ids("bad_words_ids", w, vocab) for w in bad)
        out["bad_words_ids"] = tuple(dict.fromkeys(w for w in words if not (len(w) == 1 and w[0] in eos)))
    bos, _ = get("forced_bos_token_id")
    if bos is not None and not (_int(bos) and 0 <= bos < vocab):
        raise ValueError(f"{name}: forced_bos_token_id must be a token id in [0, {vocab}), got {bos!r}")
    out["forced_bos_token_id"] = bos
    feos, _ = get("forced_eos_token_id")
    if feos is not None:
        out["forced_eos_token_id"] = _ids("forced_eos_token_id", (feos,) if _int(feos) else feos, vocab)
    for f in ("remove_invalid_values", "renormalize_logits"):
        v = get(f)[0]
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name}: {f} must be a bool, got {v!r}")
        out[f] = bool(v)
    decay = get("exponential_decay_length_penalty")[0]
    if decay is not None:
        if not (isinstance(decay, (list, tuple)) and len(decay) == 2 and _int(decay[0]) and decay[0] >= 0
                and _num(decay[1]) and decay[1] > 0):
            raise ValueError(f"{name}: exponential_decay_length_penalty must be (start_index int >= 0, "
                             f"decay_factor float > 0), got {decay!r}")
        if not eos:
            raise ValueError(f"{name}: exponential_decay_length_penalty needs an eos_token_id to penalise")
        out["exponential_decay_length_penalty"] = (int(decay[0]), float(decay[1]))
    for f in ("suppress_tokens", "begin_suppress_tokens"):
        v = get(f)[0]
        if v is not None:
            if not isinstance(v, (list, tuple)) or not all(_int(x) and x >= 0 for x in v):
                raise ValueError(f"{name}: {f} must be a list of token ids >= 0, got {v!r}")
            out[f] = tuple(int(x) for x in v if x < vocab)  # ids past the vocabulary never come (as in transformers)
    # transformers suppresses at input length prompt_len (+1 when a forced bos follows a 1-token prompt)
    out["begin_suppress_step"] = 1 if S == 1 and bos is not None else 0
    return Settings(**out)


def check_args(model, input_ids, attention_mask, generation_config=None, **explicit) -> Settings:
    """Every bad argument raises ValueError / TypeError naming it, before any work."""
    cfg = model.config
    check_ids("generate", input_ids, cfg.vocab_size, cfg.n_positions, attention_mask)
    return resolve(model, input_ids.shape[1], generation_config, **explicit)


class State:
    """Device tensors the logits processors of one call read (built once, before the first token):
    `seen` (B, V) bool, the prompt's real tokens and those made so far (repetition_penalty);
    `prompt_ids` (B, V) bool, every token of input_ids as given (encoder_repetition_penalty);
    `hist` (B, S + max_new_tokens) long, the sequence as transformers holds it (the prompt left-padded,
    then the new tokens; no_repeat_ngram_size and multi-token biases read it); `eos`, `suppress`,
    `begin_suppress`, `forced_eos` (n,) long ids; the biases as (length-1 bias (V,), groups of
    (prefixes (G, L), last ids (G,), biases (G,)))."""

    def __init__(self, s: Settings, ids: Tensor, mask: Tensor, vocab: int):
        B, S = ids.shape
        dev = ids.device

        def tensor(x):
            return torch.tensor(x, dtype=torch.long, device=dev) if x else None

        self.eos, self.suppress = tensor(s.eos_token_id), tensor(s.suppress_tokens)
        self.begin_suppress, self.forced_eos = tensor(s.begin_suppress_tokens), tensor(s.forced_eos_token_id)
        self.seen = self.prompt_ids = self.hist = None
        if s.repetition_penalty != 1.0:  # padding goes to column V, dropped
            seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=dev)
            self.seen = seen.scatter_(1, ids.masked_fill(~mask, vocab), True)[:, :vocab]
        if s.encoder_repetition_penalty != 1.0:  # transformers reads input_ids as given, padding too
            self.prompt_ids = torch.zeros(B, vocab, dtype=torch.bool, device=dev).scatter_(1, ids, True)
        self.sequence_bias = self._bias(s.sequence_bias, vocab, dev)
        self.bad_words = self._bias(tuple((w, float("-inf")) for w in s.bad_words_ids), vocab, dev)
        multi = any(len(seq) > 1 for seq, _ in s.sequence_bias) or any(len(w) > 1 for w in s.bad_words_ids)
        if s.no_repeat_ngram_size > 0 or multi:
            self.hist = torch.empty(B, S + s.max_new_tokens, dtype=torch.long, device=dev)
            left = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # padding first, then the real tokens
            self.hist[:, :S] = ids.gather(1, left)

    @staticmethod
    def _bias(pairs, vocab, dev):
        """transformers' SequenceBiasLogitsProcessor tensors: a bias per single token, and the longer
        sequences grouped by prefix length."""
        if not pairs:
            return None
        one = torch.zeros(vocab, dtype=torch.float, device=dev)
        singles = [(seq[0], b) for seq, b in pairs if len(seq) == 1]
        if singles:
            one[[t for t, _ in singles]] = torch.tensor([b for _, b in singles], device=dev)
        by_len: dict[int, list] = {}
        for seq, b in pairs:
            if len(seq) > 1:
                by_len.setdefault(len(seq) - 1, []).append((seq, b))
        groups = [(torch.tensor([q[:-1] for q, _ in g], dtype=torch.long, device=dev),
                   torch.tensor([q[-1] for q, _ in g], dtype=torch.long, device=dev),
                   torch.tensor([b for _, b in g], dtype=torch.float, device=dev)) for g in by_len.values()]
        return one, groups


def _apply_bias(scores: Tensor, bias, hist: Tensor | None) -> Tensor:
    one, groups = bias
    b = torch.zeros_like(scores)
    b += one
    for prefixes, last, values in groups:
        L = prefixes.shape[1]
        if L > hist.shape[1]:
            continue
        match = (hist[:, None, -L:] == prefixes).all(dim=-1)  # (B, G)
        b.index_add_(1, last, torch.where(match, values, 0.0).to(b.dtype))
    return scores + b


def process(scores: Tensor, s: Settings, step: int, st: State) -> Tensor:
    """transformers' logits processors for new token `step` (0-based), in the order its
    `_get_logits_processor` builds them, on the device without a host sync: sequence_bias,
    encoder_repetition_penalty, repetition_penalty, no_repeat_ngram_size, bad_words_ids,
    min_length / min_new_tokens, forced_bos_token_id, forced_eos_token_id, remove_invalid_values,
    exponential_decay_length_penalty, suppress_tokens, begin_suppress_tokens; when sampling the
    warpers temperature, top_k, top_p, min_p; then renormalize_logits.
    scores (B, V) float32, as transformers processes them; returns (B, V) float32."""
    cur = s.prompt_len + step  # transformers' input_ids.shape[-1] for this token
    hist = st.hist[:, :cur] if st.hist is not None else None
    neg = float("-inf")
    if st.sequence_bias is not None:
        scores = _apply_bias(scores, st.sequence_bias, hist)
    if st.prompt_ids is not None:  # EncoderRepetitionPenaltyLogitsProcessor
        p = 1 / s.encoder_repetition_penalty
        scores = torch.where(st.prompt_ids, torch.where(scores < 0, scores * p, scores / p), scores)
    if st.seen is not None:  # RepetitionPenaltyLogitsProcessor: score < 0 ? score * p : score / p
        p = s.repetition_penalty
        scores = torch.where(st.seen, torch.where(scores < 0, scores * p, scores / p), scores)
    n = s.no_repeat_ngram_size
    if n > 0 and cur >= n:  # NoRepeatNGramLogitsProcessor: a window matching the last n-1 tokens bans its last
        V = scores.shape[-1]
        windows = hist.unfold(1, n, 1)
        matches = (windows[..., :-1] == hist[:, cur + 1 - n:].unsqueeze(1)).all(dim=-1)
        banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
        scores = scores.masked_fill(banned[:, :V], neg)
    if st.bad_words is not None:  # NoBadWordsLogitsProcessor: a -inf sequence bias
        scores = _apply_bias(scores, st.bad_words, hist)
    if st.eos is not None and step < s.min_new_tokens:  # MinLength / MinNewTokensLength
        scores = scores.index_fill(1, st.eos, neg)
    if s.forced_bos_token_id is not None and cur == 1:  # ForcedBOSTokenLogitsProcessor
        scores = torch.full_like(scores, neg).index_fill(1, torch.tensor([s.forced_bos_token_id],
                                                                          device=scores.device), 0.0)
    if st.forced_eos is not None and step == s.max_new_tokens - 1:  # ForcedEOS: at max_length - 1
        scores = torch.full_like(scores, neg).index_fill(1, st.forced_eos, 0.0)
    if s.remove_invalid_values:  # InfNanRemoveLogitsProcessor
        fixed = torch.where(scores != scores, 0.0, scores)
        fixed = torch.where(scores == float("inf"), torch.finfo(scores.dtype).max, fixed)
        scores = torch.where(scores == neg, torch.finfo(scores.dtype).min, fixed)
    if s.exponential_decay_length_penalty is not None:  # ExponentialDecayLengthPenalty
        start, factor = s.exponential_decay_length_penalty
        if step > start:
            at = scores[:, st.eos]
            penalty = (torch.abs(at) * (pow(factor, step - start) - 1)).masked_fill(~torch.isfinite(at), 0.0)
            penalties = torch.zeros_like(scores)
            penalties[:, st.eos] = penalty
            scores = scores + penalties
    if st.suppress is not None:  # SuppressTokensLogitsProcessor
        scores = scores.index_fill(1, st.suppress, neg)
    if st.begin_suppress is not None and step == s.begin_suppress_step:  # SuppressTokensAtBegin
        scores = scores.index_fill(1, st.begin_suppress, neg)
    if s.do_sample:  # the warpers, only when sampling
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k != 0:  # TopKLogitsWarper
            kth = torch.topk(scores, min(s.top_k, scores.shape[-1]))[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, neg)
        if s.top_p < 1.0:  # TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep the top token
            srt, idx = torch.sort(scores, descending=False)
            drop = srt.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
            drop[..., -1:] = 0
            scores = scores.masked_fill(drop.scatter(1, idx, drop), neg)
        if s.min_p is not None:  # MinPLogitsWarper
            probs = torch.softmax(scores, dim=-1)
            drop = probs < s.min_p * probs.amax(dim=-1, keepdim=True)
            drop.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
            scores = scores.masked_fill(drop, neg)
    if s.renormalize_logits:  # LogitNormalization, always last
        scores = scores.log_softmax(dim=-1)
    return scores


def choose(scores: Tensor, do_sample: bool, generator: torch.Generator | None) -> Tensor:
    """Next token (B,) long from processed scores (B, V): the argmax, or a draw from softmax(scores)
    (transformers' multinomial), taken as argmax of p / Exp(1) noise, which needs no host sync and
    follows `generator`. A token at -inf has p = 0 and is never drawn."""
    if not do_sample:
        if (scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2
                and _ext.available() and not torch.compiler.is_compiling()):
            # the first index of the maximum (NaN largest), as torch.argmax, on the calling thread:
            # torch's OpenMP argmax left libgomp's worker spinning on the core the next decode
            # step's pool helper needs (csrc/argmax_cpu.cpp)
            return torch.ops.fastlm.argmax_rows(scores)
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise.clamp_min_(torch.finfo(probs.dtype).tiny)).argmax(-1)


class Decoder:
    """Cache, static input buffers and (on GPU) the captured decode step for one
    (batch, capacity). Reused across generate calls with the same sizes."""

    def __init__(self, model, batch: int, capacity: int):
        cfg = model.config
        self._model = weakref.ref(model)  # the model owns its decoders; no cycle keeps either alive
        self.cache = StaticKVCache(cfg.n_layer, batch, cfg.n_head, cfg.n_embd // cfg.n_head, capacity,
                                   model.dtype, model.device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(batch, dtype=torch.int32, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.use_graph = model.device.type == "cuda" and os.environ.get("FASTLM_CUDA_GRAPHS", "1") != "0"
        self.busy = False  # a generation is using the cache (set and cleared by _decoder / _run)

    @property
    def model(self):
        return self._model()

    def step(self, kv_len: int) -> Tensor:
        """Logits (B, V) for self.tokens at self.pos; the token's K/V is written into the cache."""
        if not self.use_graph:
            return self.model.decode_step(self.tokens, self.pos, self.cache, kv_len)
        with torch.cuda.device(self.tokens.device):  # the model's GPU, whichever is current
            if self.graph is None:
                self._capture()
            self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (Triton JIT, allocator), then capture. The warm-up writes the
        # cache rows at self.pos, which the first real step writes again. Stream, graph and its
        # memory pool live on the model's device (the caller made it current).
        dev = self.tokens.device
        s = torch.cuda.Stream(device=dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for _ in range(2):
                self.model.decode_step(self.tokens, self.pos, self.cache)
        torch.cuda.current_stream(dev).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode_step(self.tokens, self.pos, self.cache)


class _Decoders(OrderedDict):
    """A model's decoders, newest last. They are scratch state tied to that one model object (each
    holds it weakly): a copy of the model (copy.deepcopy, pickle / torch.save) starts with none,
    instead of decoding through the original's decoders (the original's weights, or a dead
    reference once it is gone) or failing to pickle the weak reference."""

    def __deepcopy__(self, memo) -> _Decoders:
        return _Decoders()

    def __reduce__(self):
        return _Decoders, ()


_DECODERS_LOCK = threading.Lock()


def _decoder(model, batch: int, capacity: int) -> Decoder:
    """A decoder for this (batch, capacity), marked busy: the caller clears `busy` when its
    generation ends. The model's cached one when it is free; while another generation holds it
    (a second stream in flight, another thread), a fresh one that is not kept."""
    with _DECODERS_LOCK:
        decoders = model.__dict__.get("_fastlm_decoders")
        if not isinstance(decoders, _Decoders):
            decoders = model.__dict__["_fastlm_decoders"] = _Decoders()
        key = (batch, capacity, model.dtype, str(model.device))
        if key in decoders and decoders[key].model is not model:  # copied some other way (copy.copy)
            decoders.clear()
        if key in decoders:
            decoders.move_to_end(key)
            dec = decoders[key]
            if dec.busy:  # in use by a generation still in flight: this one gets its own cache
                dec = Decoder(model, batch, capacity)
        else:
            while len(decoders) >= KEEP_DECODERS:
                decoders.popitem(last=False)
            dec = decoders[key] = Decoder(model, batch, capacity)
        dec.busy = True
        return dec


@torch.inference_mode()
def _run(model, input_ids, attention_mask, s: Settings, seed, check_every) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields (new tokens (B,), finished (B,) bool) per step."""
    device = model.device
    ids = input_ids.to(device)
    if attention_mask is not None:
        mask = attention_mask.to(device).bool()
    else:  # transformers' _prepare_attention_mask_for_generation: pad ids are padding, unless pad is an eos id
        mask = torch.ones_like(ids, dtype=torch.bool)
        if s.pad_token_id is not None and s.pad_token_id not in s.eos_token_id:
            not_pad = ids != s.pad_token_id
            if not bool(not_pad.all()):  # one host sync per call
                mask = not_pad
    lens = mask.sum(1)  # (B,)
    lens_host = lens.tolist()  # one sync per call, for sizes
    if min(lens_host) == 0:
        raise ValueError(f"generate: attention_mask row {lens_host.index(0)} has no tokens (empty prompt)")
    T = max(lens_host)
    n_pos = model.config.n_positions
    if T + s.max_new_tokens > n_pos:
        raise ValueError(f"generate: prompt ({T} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds the model's "
                         f"{n_pos} positions")
    B, V = ids.shape[0], model.config.vocab_size
    # left-align: real tokens first, in order (a stable sort of the padding flags)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :T]
    ids_l, kpm = ids.gather(1, order), mask.gather(1, order)  # (B, T)
    capacity = min(-(-(T + s.max_new_tokens) // CAPACITY_BUCKET) * CAPACITY_BUCKET, n_pos)
    dec = _decoder(model, batch_bucket(model, B), capacity)  # rows past B are idle padding; busy until we end
    try:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        st = State(s, ids, mask, V)

        if bool(kpm.all()):  # prompts of one length: the LM head on the last position only (B, 1, V); over
            # all T it was ~10% of a B=32 GPT-2 small generate's FLOPs (32 x 16 prompts, 32 new tokens)
            logits = model.prefill(ids_l, None, dec.cache, last_only=True)[:, -1]  # (B, V)
        else:
            logits = model.prefill(ids_l, kpm, dec.cache)  # (B, T, V)
            logits = logits[torch.arange(B, device=device), lens - 1]  # (B, V): each prompt's last token
        dec.pos.zero_()  # idle bucket rows decode token 0 from position 0 onwards; nobody reads them
        dec.tokens.zero_()
        dec.pos[:B].copy_(lens.to(torch.int32))
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(s.max_new_tokens):
            nxt = choose(process(logits.float(), s, step, st), s.do_sample, generator)
            if st.eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, s.pad_token_id), nxt)
                finished = finished | torch.isin(nxt, st.eos)
            if st.seen is not None:
                st.seen.scatter_(1, nxt[:, None], True)
            if st.hist is not None:
                st.hist[:, s.prompt_len + step] = nxt
            yield nxt, finished
            if step == s.max_new_tokens - 1:
                break
            if st.eos is not None and step % check_every == check_every - 1 and bool(finished.all()):
                break
            dec.tokens[:B].copy_(nxt)
            logits = dec.step(kv_len=T + step + 1)[:B]
            dec.pos.add_(1)
    finally:
        dec.busy = False


_DOC_ARGS = """
    Arguments are resolved as transformers' generate resolves them: an argument given (not None)
    wins, then `generation_config` (a transformers GenerationConfig for this call), then the model's
    generation_config (what fastlm.from_pretrained read from generation_config.json, or the
    transformers model's; a model without one: its config), then transformers' defaults: greedy,
    20 new tokens (max_length 20 + the prompt, capped at the model's positions), and when sampling
    temperature 1, top_k 50, top_p 1.
    max_new_tokens: new tokens at most. Else max_length (int, the padded prompt included) sets
        max_length - input_ids.shape[1] new tokens; else 20. Either side may come from the checkpoint.
    do_sample, temperature, top_k (0 = off), top_p (in [0, 1]), min_p: transformers' multinomial
        sampling, its warpers applied in its order (temperature, top_k, top_p, min_p); the draw
        follows `seed` (int) but is not transformers' random stream: each token lies in the
        support transformers' warpers leave.
    eos_token_id: an id or a list of ids; a sequence that makes one has finished, is padded with
        pad_token_id (default: the first eos id) and generation stops when all have finished.
    min_new_tokens, min_length (prompt included; min_new_tokens wins): no eos id before then.
    repetition_penalty, encoder_repetition_penalty (float > 0, 1 = off), no_repeat_ngram_size
        (int, 0 = off), bad_words_ids (list of lists of ids), sequence_bias ({(ids...): float} or
        [[ids], float] pairs), suppress_tokens, begin_suppress_tokens (lists of ids),
        forced_bos_token_id, forced_eos_token_id (id or ids, forced at max_length - 1),
        exponential_decay_length_penalty ((start, factor), needs eos), remove_invalid_values,
        renormalize_logits (bool): transformers' logits processors of those names, applied in its
        order to the float32 logits, on the device (fastlm.generation.process).
    attention_mask None: every token is real, except (as in transformers) the pad_token_id ones when
    input_ids hold some and pad_token_id is no eos id.
    Padded sequences count as transformers counts a left-padded batch (lengths include the padding;
    no_repeat_ngram_size and multi-token biases see the padding ids); right padding is read as the
    same prompts left-padded.
    Other transformers generate options: those that change no token of greedy search or sampling
    with one beam (use_cache, cache_implementation, length_penalty, ...: fastlm.generation.IGNORED)
    are accepted and ignored; those fastlm does not implement (num_beams > 1, typical_p < 1 when
    sampling, guidance_scale, num_return_sequences > 1, output_scores, logits_processor, ...:
    fastlm.generation.REFUSED) raise ValueError naming the option, whether it comes from the call,
    generation_config or the checkpoint, when it would take effect; an unknown name raises TypeError.
    Raises ValueError / TypeError naming a bad argument before any work."""


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             max_new_tokens: int | None = None, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             min_new_tokens: int | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, check_every: int = 8, generation_config=None, **kwargs) -> Tensor:
    """input_ids (B, S) integer token ids (+ attention_mask (B, S) 0/1, either padding side) ->
    (B, S + new) LongTensor on the model's device: the input as given, then the new tokens (fewer
    than the maximum when every sequence has made an eos id). Greedy output equals transformers'
    generate with the same arguments and checkpoint, token for token (fp32)."""
    s = check_args(model, input_ids, attention_mask, generation_config, max_new_tokens=max_new_tokens,
                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, min_new_tokens=min_new_tokens,
                   repetition_penalty=repetition_penalty, **kwargs)
    steps, done = [], []
    for nxt, fin in _run(model, input_ids, attention_mask, s, seed, check_every):
        steps.append(nxt)
        done.append(fin)
    new = torch.stack(steps, 1)  # (B, n)
    if s.eos_token_id:
        all_done = torch.stack(done, 1).all(0).tolist()  # (n,) after each step
        if True in all_done:
            new = new[:, : all_done.index(True) + 1]  # stop at the step the last sequence ended
    return torch.cat([input_ids.to(new.device), new], 1)


def stream(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
           max_new_tokens: int | None = None, do_sample: bool | None = None,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
           min_new_tokens: int | None = None, repetition_penalty: float | None = None,
           seed: int | None = None, generation_config=None, **kwargs) -> Iterator[Tensor]:
    """Yields the new tokens (B,) long of each step as they are made (on the CPU), until every
    sequence has finished or the maximum is reached; the arguments are checked at the call, before
    the first next()."""
    s = check_args(model, input_ids, attention_mask, generation_config, max_new_tokens=max_new_tokens,
                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, min_new_tokens=min_new_tokens,
                   repetition_penalty=repetition_penalty, **kwargs)
    return _stream(model, input_ids, attention_mask, s, seed)


def _stream(model, input_ids, attention_mask, s: Settings, seed) -> Iterator[Tensor]:
    for nxt, fin in _run(model, input_ids, attention_mask, s, seed, check_every=1):
        yield nxt.cpu()
        if s.eos_token_id and bool(fin.all()):
            return


generate.__doc__ += _DOC_ARGS
stream.__doc__ += _DOC_ARGS
