"""fastlm.Embedder: batch sentence embeddings with fastlm's encoders (the `fastlm embed` CLI's
engine).

It reads a checkpoint directory the way sentence-transformers 6 does (fastlm/st_checkpoint.py):
`modules.json` names the Transformer module (its directory holds the model, the tokenizer and
sentence_bert_config.json: max_seq_length, do_lower_case, tokenizer arguments, ...), the Pooling
module (its `config.json`: cls / mean / max / mean_sqrt_len_tokens / weightedmean / lasttoken,
several modes concatenated in that order, include_prompt) and the modules after it (Dense,
LayerNorm, Dropout, Normalize); config_sentence_transformers.json gives prompts, the default prompt
name and truncate_dim. A setting fastlm cannot apply is refused with a ValueError naming the file and
key. A plain transformers directory (no modules.json) gets mean pooling (lasttoken for a
*ForCausalLM architecture) and no normalisation. Texts are sorted by token length into batches
(less padding), encoded, pooled, and returned in the input order.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from fastlm.st_checkpoint import (  # noqa: F401  (re-exported: the reading is part of fastlm.embed's API)
    DEFAULT_PROMPTS,
    POOLING_MODES,
    Pipeline,
    Step,
    pooling_modes,
    read_pipeline,
)

log = logging.getLogger("fastlm")

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")  # sentence-transformers' encode(precision=)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model")


def has_tokenizer_files(model_dir: str) -> bool:
    """Whether `model_dir` holds a tokenizer's vocabulary (one of TOKENIZER_FILES). transformers 5
    builds a tokenizer from a directory without one all the same, with an empty vocabulary (special
    tokens only: every text encodes to nothing or [UNK]s, every id decodes to ""), so callers ask
    this first."""
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


def pool(h: Tensor, mask: Tensor, modes: Sequence[str], *, full_mask: Tensor | None = None) -> Tensor:
    """sentence-transformers' pooling of token states h (B, S, C) under mask (B, S) -> (B, C * len(modes)),
    computed in float32. full_mask: the attention mask before a prompt's tokens were taken out of
    `mask` (include_prompt=False); weightedmean counts its position weights from full_mask's first
    real token, as sentence-transformers does (default: mask)."""
    h, m = h.float(), mask.to(h.device)
    fm = m if full_mask is None else full_mask.to(h.device)
    mf = m.unsqueeze(-1).float()  # (B, S, 1)
    out = []
    for mode in modes:
        if mode == "cls":  # the first real token (position 0 under right padding)
            first = m.int().argmax(1)  # (B,)
            out.append(h[torch.arange(h.shape[0], device=h.device), first])
        elif mode == "max":
            out.append(h.masked_fill(mf == 0, float("-inf")).max(1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            n = mf.sum(1).clamp(min=1e-9)  # (B, 1)
            out.append((h * mf).sum(1) / (n if mode == "mean" else n.sqrt()))
        elif mode == "weightedmean":
            w = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
            w = w - fm.int().argmax(1).view(-1, 1, 1)  # positions counted from the first real token
            wm = mf * w
            out.append((h * wm).sum(1) / wm.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":
            values, idx = m.flip(1).max(1)
            idx = torch.where(values == 0, h.shape[1] - 1, idx)
            out.append((h * mf)[torch.arange(h.shape[0], device=h.device), h.shape[1] - idx - 1])
        else:
            raise ValueError(f"pool: unknown mode {mode!r}")
    return torch.cat(out, -1)


def _base_head(model_type: str) -> str:
    from fastlm.models.loading import MODEL_TYPES

    return "GPT2Model" if model_type == "gpt2" else MODEL_TYPES[model_type].__name__


def _texts(fn: str, texts) -> list[str]:
    """Any iterable of str (list, tuple, generator, numpy array of str, ...) -> list[str]; a single
    str (whose iteration gives characters) or a non-str item raises TypeError saying what is accepted."""
    accepted = "an iterable of str (a list, tuple, generator, ...); wrap a single text in a list"
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{fn}: texts must be {accepted}, got a single {type(texts).__name__}")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"{fn}: texts must be {accepted}, got {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"{fn}: texts must be {accepted}; item {i} is a {type(t).__name__}")
    return items


def quantize_embeddings(emb: Tensor, precision: str) -> Tensor:
    """float32 embeddings (N, d) -> sentence-transformers' quantize_embeddings(emb, precision), as
    a Tensor:

    - "float32": unchanged;
    - "int8" / "uint8": per dimension, the range [min, max] over these N embeddings cut into 255
      steps, q = floor((x - min) / step) in [0, 255] (uint8), minus 128 for int8; (N, d). Ranges
      need N >= 2 (ValueError, as in sentence-transformers);
    - "binary" / "ubinary": x > 0 as bits packed 8 per byte, big-endian (numpy.packbits), minus 128
      for binary (int8); (N, ceil(d / 8)).
    Computed in numpy float32 as sentence-transformers does, so the values are identical."""
    import numpy as np

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    x = emb.detach().cpu().float().numpy()
    if precision == "float32":
        return torch.from_numpy(x)
    n, d = x.shape
    if precision.endswith("int8"):
        if n == 0:
            q = np.zeros((0, d), dtype=np.uint8)
        elif n == 1:
            raise ValueError(f"precision={precision!r} computes its ranges from the embeddings of this call and "
                             "cannot from a single embedding; encode more texts at once")
        else:
            starts, ends = x.min(0), x.max(0)
            steps = (ends - starts) / 255
            steps = np.where(steps == 0, 1, steps)
            q = np.clip(np.floor((x - starts) / steps), 0, 255)
        out = q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    else:
        if n == 0:
            bits = np.zeros((0, (d + 7) // 8), dtype=np.uint8)
        else:
            bits = np.packbits(x > 0, axis=-1)
        out = bits if precision == "ubinary" else (bits - 128).astype(np.int8)
    return torch.from_numpy(np.ascontiguousarray(out))


def _lowercase(tok) -> None:
    """sentence_bert_config.json's do_lower_case, as sentence-transformers applies it: a Lowercase
    normalizer in front of a fast tokenizer's own (unless it has one), or the slow tokenizer's flag."""
    if getattr(tok, "is_fast", False):
        from tokenizers.normalizers import Lowercase
        from tokenizers.normalizers import Sequence as NormalizerSequence

        normalizer = tok.backend_tokenizer.normalizer
        has = isinstance(normalizer, Lowercase) or (isinstance(normalizer, NormalizerSequence)
                                                    and any(isinstance(n, Lowercase) for n in normalizer))
        if not has:
            new = [Lowercase()]
            if isinstance(normalizer, NormalizerSequence):
                new += list(normalizer)
            elif normalizer is not None:
                new.append(normalizer)
            tok.backend_tokenizer.normalizer = NormalizerSequence(new)
    else:
        try:
            tok.do_lower_case = True
        except AttributeError:
            tok.basic_tokenizer.do_lower_case = True


def _check_truncate_dim(fn: str, truncate_dim) -> None:
    if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                     or truncate_dim < 1):
        raise ValueError(f"{fn}: truncate_dim must be a positive int or None, got {truncate_dim!r}")


class Embedder:
    """Sentence embeddings from a checkpoint directory.

    Embedder(src, *, device=None, dtype=None, quantize=None, pooling=None, normalize=None,
    truncate=False, max_length=None).encode(texts, batch_size=32) -> float32 Tensor (N, d) on the CPU.

    - src: a sentence-transformers directory (modules.json, 1_Pooling/, config_sentence_transformers.json
      with its prompts, ...) or a transformers one (mean pooling). The encoder is the checkpoint's
      base model (BertModel, RobertaModel, ...; GPT2Model for a GPT-2 checkpoint: its last hidden
      states mean-pooled, as SentenceTransformer(dir) does).
    - device: "cpu", "cuda", "cuda:1", a torch.device (default CUDA when available, else CPU); a
      GPU this machine does not have raises ValueError. dtype: a torch dtype or its name ("float16",
      "fp16", "bf16", ...; "auto" or None: float16 on CUDA, else float32).
    - quantize: passed to fastlm.from_pretrained (ValueError where this build's from_pretrained
      has no quantize support).
    - pooling: override the modes (see POOLING_MODES); normalize: override the final L2
      normalisation (a Normalize module at the end of the checkpoint's modules).
    - max_length: the longest text in tokens. Default: the limit sentence-transformers uses, from
      (first found) the checkpoint's processing_kwargs max_length, its tokenizer arguments'
      model_max_length or max_seq_length (sentence_bert_config.json), else the tokenizer's
      model_max_length (tokenizer_config.json) capped at the model's positions; never more than the
      model's positions (`max_length_source` names where it came from). A longer text raises
      ValueError naming the limit and its source, unless truncate=True, which cuts it to max_length
      (as sentence-transformers always does).
    - prompts / default_prompt_name: as SentenceTransformer's (merged over the saved ones).
    - truncate_dim: as SentenceTransformer's (default: the saved one).
    - dtype None also honours the checkpoint's model_kwargs dtype (sentence_bert_config.json).
    Every setting of a sentence-transformers checkpoint is applied as sentence-transformers applies
    it, or refused with ValueError naming the file and key (fastlm.st_checkpoint lists them).
    Raises FileNotFoundError / ValueError for a missing directory, tokenizer or unsupported module.
    """

    def __init__(self, src: str | os.PathLike, *, device=None, dtype: torch.dtype | str | None = None,
                 quantize: str | None = None, pooling: Sequence[str] | None = None,
                 normalize: bool | None = None, truncate: bool = False, max_length: int | None = None,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                 truncate_dim: int | None = None):
        import fastlm
        from fastlm import _checks

        device = _checks.model_device("Embedder", device)
        dtype = _checks.model_dtype("Embedder", dtype)
        if isinstance(pooling, str):
            pooling = (pooling,)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise TypeError(f"Embedder: max_length must be an int or None, got {type(max_length).__name__}")
        _check_truncate_dim("Embedder", truncate_dim)
        path = os.fspath(src)
        self.pipeline = read_pipeline(path)
        pipe = self.pipeline
        if pooling is not None:
            modes = pooling_modes({"pooling_mode": list(pooling)})
            if len(modes) != len(pipe.pooling) and any(s.kind in ("Dense", "LayerNorm") for s in pipe.steps):
                raise ValueError(f"Embedder: pooling={list(pooling)} changes the pooled dimension, but the "
                                 f"checkpoint's {pipe.steps[0].source} module expects the pooling of "
                                 f"{'+'.join(pipe.pooling)}")
            pipe.pooling = modes
        if normalize is not None:
            pipe.normalize = bool(normalize)
        if prompts is not None:
            if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
                raise TypeError("Embedder: prompts must be a dict of name -> prompt str")
            pipe.prompts.update(prompts)
        if default_prompt_name is not None:
            pipe.default_prompt_name = default_prompt_name
        if truncate_dim is not None:
            pipe.truncate_dim = truncate_dim
        name = pipe.default_prompt_name
        if name is not None and name not in pipe.prompts:
            raise ValueError(f"Embedder: default_prompt_name {name!r} is not one of the prompts "
                             f"{sorted(pipe.prompts)}")
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        source_dtype = False  # from_pretrained keeps the weights' dtype
        if dtype is None and pipe.model_dtype is not None:  # the checkpoint's model_kwargs dtype
            if pipe.model_dtype == "auto":
                source_dtype = True
            else:
                try:
                    dtype = _checks.model_dtype("Embedder", pipe.model_dtype)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"Embedder: {pipe.sbert_config}: model_kwargs dtype: {e}") from None
        if dtype is None and not source_dtype:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        kw = {}
        if quantize is not None:
            if "quantize" not in inspect.signature(fastlm.from_pretrained).parameters:
                raise ValueError(f"Embedder: quantize={quantize!r} needs quantization support in "
                                 "fastlm.from_pretrained, which this build of fastlm does not have")
            kw["quantize"] = quantize
        model_dir = pipe.model_dir
        from fastlm.models.loading import _read_config

        config = _read_config(model_dir)
        self.tokenizer, st_limit, st_source = self._tokenizer(model_dir, pipe, config)
        if config.model_type == "gpt2":
            log.info("Embedder: %s is a GPT-2 (decoder) checkpoint: its GPT2Model's last hidden states are pooled "
                     "(%s), as sentence-transformers does", model_dir, "+".join(pipe.pooling))
        self.model = fastlm.from_pretrained(model_dir, dtype=dtype, device=device, head=_base_head(config.model_type),
                                            **kw)
        limit = self.model.embeddings.max_tokens if hasattr(self.model, "embeddings") else self.model.config.n_positions
        source = "the model's positions"
        if max_length is not None:
            if max_length < 1 or max_length > limit:
                raise ValueError(f"Embedder: max_length must lie in [1, {limit}] (the model's positions), "
                                 f"got {max_length}")
            limit, source = max_length, "max_length"
        elif st_limit < limit:
            limit, source = st_limit, st_source
        # the limit, and the setting it comes from (named when a text is over it)
        self.max_length, self.max_length_source = limit, source
        self.truncate, self.device = truncate, device
        self._steps = [s.module.to(device) if s.module is not None else None for s in pipe.steps]

    @staticmethod
    def _tokenizer(model_dir: str, pipe: Pipeline, config):
        """The tokenizer as sentence-transformers' Transformer builds it, and the sequence limit it
        sets with the setting that set it: (tokenizer, limit, where the limit comes from)."""
        from transformers import AutoTokenizer

        # transformers 5 builds an empty tokenizer (special tokens only) from a directory without
        # vocabulary files: every text would become [UNK]s. Ask for the files first.
        if not has_tokenizer_files(model_dir):
            raise ValueError(f"Embedder: no tokenizer in {model_dir} (looked for {', '.join(TOKENIZER_FILES)})")
        kwargs = dict(pipe.tokenizer_kwargs)
        if "model_max_length" in kwargs:
            source = f"processor_kwargs model_max_length in {pipe.sbert_config}"
        elif pipe.max_seq_length is not None:  # as Transformer(max_seq_length=) passes it on
            kwargs["model_max_length"] = pipe.max_seq_length
            source = f"max_seq_length in {pipe.sbert_config}"
        else:
            source = f"model_max_length in {os.path.join(model_dir, 'tokenizer_config.json')}"
        try:
            tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **kwargs)
        except Exception as e:  # transformers raises OSError / ValueError / others for a missing tokenizer
            where = (f" with processor_kwargs {pipe.tokenizer_kwargs} from {pipe.sbert_config}"
                     if pipe.tokenizer_kwargs else "")
            raise ValueError(f"Embedder: no usable tokenizer in {model_dir}{where} ({type(e).__name__}: {e})") from e
        positions = getattr(config, "max_position_embeddings", None)
        if "model_max_length" not in kwargs and isinstance(positions, int) and positions != -1 \
                and positions < tok.model_max_length:  # sentence-transformers caps it at the model's positions
            tok.model_max_length = positions
            source = "the model's positions"
        if pipe.do_lower_case:
            _lowercase(tok)
        limit = tok.model_max_length
        if "max_length" in pipe.call_kwargs:
            limit, source = pipe.call_kwargs["max_length"], f"processing_kwargs max_length in {pipe.sbert_config}"
        return tok, int(limit), source

    @property
    def dim(self) -> int:
        """The embedding dimension encode returns (after Dense modules and truncate_dim)."""
        d = self._pooled_dim
        return min(d, self.pipeline.truncate_dim) if self.pipeline.truncate_dim else d

    @property
    def _pooled_dim(self) -> int:
        d = self.model.config.hidden_size * len(self.pipeline.pooling)
        for s in self.pipeline.steps:
            d = s.out_dim or d
        return d

    @property
    def prompts(self) -> dict[str, str]:
        """The prompts by name (sentence-transformers' defaults, the saved ones, then the given ones)."""
        return self.pipeline.prompts

    @property
    def similarity_fn_name(self) -> str:
        """The checkpoint's similarity function name (cosine when it names none), as sentence-transformers
        reads it; encode does not use it."""
        return self.pipeline.similarity_fn_name or "cosine"

    def _call_kwargs(self, truncate: bool) -> dict:
        add = self.pipeline.call_kwargs.get("add_special_tokens", True)
        return dict(add_special_tokens=add, truncation=truncate, max_length=self.max_length if truncate else None)

    def tokenize(self, texts: Iterable[str]) -> list[list[int]]:
        """Token ids of each text (special tokens added unless the checkpoint's processing_kwargs say
        otherwise); raises TypeError for texts that are not an iterable of str, ValueError for a text
        over max_length unless truncate (naming the limit and the setting it comes from), or for a
        text with no token at all (an empty text under a tokenizer that adds no special token: GPT-2)."""
        texts = _texts("Embedder.encode", texts)
        if not texts:
            return []
        enc = self.tokenizer(texts, **self._call_kwargs(self.truncate))["input_ids"]
        for i, ids in enumerate(enc):
            if not self.truncate and len(ids) > self.max_length:
                raise ValueError(f"text {i + 1} has {len(ids)} tokens, more than the model's {self.max_length} "
                                 f"(the limit from {self.max_length_source}; pass truncate=True / --truncate to "
                                 "cut it)")
            if not ids:
                raise ValueError(f"text {i + 1} has no token to embed (an empty text, and this tokenizer adds no "
                                 "special token)")
        return enc

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """sentence-transformers' rule: an explicit prompt wins, else prompt_name's, else the default
        prompt name's; an empty prompt is no prompt."""
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"Embedder.encode: prompt must be a str or None, got {type(prompt).__name__}")
        if prompt is None:
            name = prompt_name if prompt_name is not None else self.pipeline.default_prompt_name
            if name is not None:
                if name not in self.pipeline.prompts:
                    raise ValueError(f"Embedder.encode: prompt_name {name!r} is not one of the prompts "
                                     f"{sorted(self.pipeline.prompts)}")
                prompt = self.pipeline.prompts[name]
        return prompt or None

    def _prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt alone, less a trailing special token (as sentence-transformers counts
        the prompt tokens that include_prompt=False leaves out of the pooling)."""
        ids = self.tokenizer([prompt], **self._call_kwargs(True))["input_ids"][0]  # truncated, as there
        if ids and ids[-1] in set(self.tokenizer.all_special_ids):
            return len(ids) - 1
        return len(ids)

    @torch.inference_mode()
    def encode(self, texts: Iterable[str], batch_size: int = 32, *, progress: bool = False,
               show_progress_bar: bool | None = None, normalize_embeddings: bool = False,
               convert_to_tensor: bool | None = None, convert_to_numpy: bool | None = None,
               prompt_name: str | None = None, prompt: str | None = None, precision: str = "float32",
               truncate_dim: int | None = None):
        """texts -> embeddings (N, d) in input order; by default a float32 Tensor on the CPU.

        texts: any iterable of str (a single str raises TypeError). An empty one gives an empty
        result ((0, d)) without running the model. The keyword arguments are sentence-transformers'
        `encode` flags, with its semantics:

        - batch_size: texts per forward (a positive int, else ValueError);
        - show_progress_bar (alias progress): a tqdm bar on standard error;
        - normalize_embeddings: L2-normalise the result (on top of a Normalize module, if any);
        - prompt / prompt_name: a text prepended to every text (an explicit prompt wins over
          prompt_name, which names one of `self.prompts`; default: the checkpoint's
          default_prompt_name). With the Pooling config's include_prompt=False the prompt's tokens
          are left out of the pooling, as sentence-transformers does;
        - precision: "float32" (default), "int8" / "uint8" (N, d) or "binary" / "ubinary"
          (N, ceil(d / 8)) int8 / uint8 values, as sentence-transformers' quantize_embeddings
          (fastlm.embed.quantize_embeddings) computes them over the N embeddings of this call;
        - convert_to_tensor=True: one Tensor (N, d) (this is also the default, unlike
          sentence-transformers, whose default is numpy); convert_to_numpy=True: one numpy array
          (N, d); convert_to_tensor wins over convert_to_numpy, and both explicitly False gives a
          list of N 1-D Tensors, as in sentence-transformers;
        - truncate_dim: keep the first truncate_dim dimensions (default: the Embedder's, else the
          checkpoint's config_sentence_transformers.json truncate_dim), after the checkpoint's
          modules (Normalize included) and before normalize_embeddings, as sentence-transformers does.
        Raises TypeError (texts, prompt), ValueError (batch_size, precision, prompt_name, truncate_dim,
        a text too long or without tokens, non-finite embeddings)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Embedder.encode: batch_size must be a positive int, got {batch_size!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"Embedder.encode: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        _check_truncate_dim("Embedder.encode", truncate_dim)
        texts = _texts("Embedder.encode", texts)
        prompt = self._prompt(prompt, prompt_name)
        skip = 0
        if prompt is not None:
            texts = [prompt + t for t in texts]
            if not self.pipeline.include_prompt:
                skip = self._prompt_length(prompt)
        ids = self.tokenize(texts)
        out = torch.empty(len(ids), self._pooled_dim, dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: similar lengths share a batch
        bar = None
        if (show_progress_bar if show_progress_bar is not None else progress) and ids:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), unit="texts", desc="embed", dynamic_ncols=True)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            S = max(len(ids[i]) for i in chunk)
            x = torch.full((len(chunk), S), pad, dtype=torch.long)  # (b, S), right-padded
            mask = torch.zeros(len(chunk), S, dtype=torch.long)
            for r, i in enumerate(chunk):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            x, mask = x.to(self.device), mask.to(self.device)
            h = self.model(x, mask).last_hidden_state  # (b, S, C)
            pool_mask = mask
            if skip:  # include_prompt=False: the prompt's tokens (first `skip` positions) are not pooled
                pool_mask = mask.clone()
                pool_mask[:, :skip] = 0
            e = pool(h, pool_mask, self.pipeline.pooling, full_mask=mask)  # (b, d) float32
            for step, module in zip(self.pipeline.steps, self._steps, strict=True):  # Dense, LayerNorm, ...
                if module is not None:
                    e = module(e)
                elif step.kind == "Normalize":
                    e = torch.nn.functional.normalize(e, p=2, dim=1)
            if self.pipeline.normalize:
                e = torch.nn.functional.normalize(e, p=2, dim=1)
            out[torch.tensor(chunk)] = e.cpu()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if out.numel() and not bool(torch.isfinite(out).all()):
            raise ValueError("Embedder.encode: the model produced non-finite embeddings (try dtype=torch.float32)")
        dim = truncate_dim if truncate_dim is not None else self.pipeline.truncate_dim
        if dim is not None:  # before normalize_embeddings, as sentence-transformers truncates
            out = out[:, :dim].contiguous()
        if normalize_embeddings:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        out = quantize_embeddings(out, precision)
        if convert_to_tensor or (convert_to_tensor is None and convert_to_numpy is None):
            return out  # fastlm's default: one Tensor
        if convert_to_numpy is False:
            return list(out)  # both off: a list of 1-D Tensors, as sentence-transformers gives
        return out.numpy()  # convert_to_numpy=True, or convert_to_tensor=False (sentence-transformers' default)
