"""fastlm.Embedder: batch sentence embeddings with fastlm's encoders (the `fastlm embed` CLI's
engine).

It reads a checkpoint directory the way sentence-transformers does: `modules.json` names the
Transformer module (its directory holds the model and tokenizer), the Pooling module (its
`config.json`: cls / mean / max / mean_sqrt_len_tokens / weightedmean / lasttoken, several modes
concatenated in that order, as sentence-transformers 6 does) and an optional Normalize module (L2);
`sentence_bert_config.json` gives max_seq_length. A plain transformers directory (no modules.json)
gets mean pooling and no normalisation. Texts are sorted by token length into batches (less
padding), encoded, pooled, and returned in the input order.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger("fastlm")

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING = {  # sentence-transformers' pooling_mode_* keys, in its concatenation order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model")


@dataclass
class Pipeline:
    """What a checkpoint directory asks for."""

    model_dir: str
    pooling: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Embedder: cannot read {path}: {e}") from e


def pooling_modes(cfg: dict) -> tuple[str, ...]:
    """A sentence-transformers Pooling config -> its modes (legacy pooling_mode_* booleans or the
    newer `pooling_mode` string / list); none set means mean, as sentence-transformers does."""
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for k, m in _LEGACY_POOLING.items() if cfg.get(k, False)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ValueError(f"Embedder: pooling mode {bad[0]!r} is not supported (supported: {', '.join(POOLING_MODES)})")
    if cfg.get("include_prompt", True) is False:
        log.info("Embedder: include_prompt=False only matters with prompts, which fastlm embed does not add")
    return modes


def read_pipeline(path: str) -> Pipeline:
    """The modules of a sentence-transformers directory, or mean pooling for a plain one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Embedder: {path} is not a directory (expected a checkpoint directory)")
    modules_file = os.path.join(path, "modules.json")
    model_dir, pooling, normalize = path, ("mean",), False
    if os.path.isfile(modules_file):
        pooling = None
        for m in _read_json(modules_file):
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            sub = os.path.join(path, m.get("path", ""))
            if kind == "Transformer":
                model_dir = sub
            elif kind == "Pooling":
                cfg_file = os.path.join(sub, "config.json")
                pooling = pooling_modes(_read_json(cfg_file) if os.path.isfile(cfg_file) else {})
            elif kind == "Normalize":
                normalize = True
            else:
                raise ValueError(f"Embedder: {modules_file} has a {kind!r} module, which fastlm does not run "
                                 "(supported: Transformer, Pooling, Normalize)")
        if pooling is None:
            pooling = ("mean",)
    max_seq = None
    for d in (path, model_dir):
        f = os.path.join(d, "sentence_bert_config.json")
        if os.path.isfile(f):
            max_seq = _read_json(f).get("max_seq_length")
            break
    return Pipeline(model_dir, pooling, normalize, max_seq)


def pool(h: Tensor, mask: Tensor, modes: Sequence[str]) -> Tensor:
    """sentence-transformers' pooling of token states h (B, S, C) under mask (B, S) -> (B, C * len(modes)),
    computed in float32."""
    h, m = h.float(), mask.to(h.device)
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
            w = w - m.int().argmax(1).view(-1, 1, 1)  # positions counted from the first real token
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


class Embedder:
    """Sentence embeddings from a checkpoint directory.

    Embedder(src, *, device=None, dtype=None, quantize=None, pooling=None, normalize=None,
    truncate=False, max_length=None).encode(texts, batch_size=32) -> float32 Tensor (N, d) on the CPU.

    - src: a sentence-transformers directory (modules.json, 1_Pooling/, ...) or a transformers one
      (mean pooling). The encoder is the checkpoint's base model (BertModel, RobertaModel, ...).
    - device: default CUDA when available, else CPU; dtype: default float16 on CUDA, else float32.
    - quantize: passed to fastlm.from_pretrained (ValueError where this build's from_pretrained
      has no quantize support).
    - pooling: override the modes (see POOLING_MODES); normalize: override L2 normalisation.
    - max_length: the longest text in tokens (default the checkpoint's max_seq_length, else the
      model's positions); a longer text raises ValueError naming it, unless truncate=True, which
      cuts it to max_length (as sentence-transformers always does).
    Raises FileNotFoundError / ValueError for a missing directory, tokenizer or unsupported module.
    """

    def __init__(self, src: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                 quantize: str | None = None, pooling: Sequence[str] | None = None,
                 normalize: bool | None = None, truncate: bool = False, max_length: int | None = None):
        import fastlm

        path = os.fspath(src)
        self.pipeline = read_pipeline(path)
        if pooling is not None:
            self.pipeline.pooling = pooling_modes({"pooling_mode": list(pooling)})
        if normalize is not None:
            self.pipeline.normalize = bool(normalize)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        kw = {}
        if quantize is not None:
            if "quantize" not in inspect.signature(fastlm.from_pretrained).parameters:
                raise ValueError(f"Embedder: quantize={quantize!r} needs quantization support in "
                                 "fastlm.from_pretrained, which this build of fastlm does not have")
            kw["quantize"] = quantize
        model_dir = self.pipeline.model_dir
        self.tokenizer = self._tokenizer(model_dir)
        from fastlm.models.loading import _read_config

        model_type = _read_config(model_dir).model_type
        self.model = fastlm.from_pretrained(model_dir, dtype=dtype, device=device, head=_base_head(model_type), **kw)
        limit = self.model.embeddings.max_tokens if hasattr(self.model, "embeddings") else self.model.config.n_positions
        if max_length is not None:
            if max_length < 1 or max_length > limit:
                raise ValueError(f"Embedder: max_length must lie in [1, {limit}] (the model's positions), "
                                 f"got {max_length}")
            limit = max_length
        elif self.pipeline.max_seq_length:
            limit = min(limit, int(self.pipeline.max_seq_length))
        self.max_length, self.truncate, self.device = limit, truncate, device

    @staticmethod
    def _tokenizer(model_dir: str):
        from transformers import AutoTokenizer

        # transformers 5 builds an empty tokenizer (special tokens only) from a directory without
        # vocabulary files: every text would become [UNK]s. Ask for the files first.
        if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
            raise ValueError(f"Embedder: no tokenizer in {model_dir} (looked for {', '.join(TOKENIZER_FILES)})")
        try:
            return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:  # transformers raises OSError / ValueError / others for a missing tokenizer
            raise ValueError(f"Embedder: no usable tokenizer in {model_dir} ({type(e).__name__}: {e})") from e

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size * len(self.pipeline.pooling)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (special tokens added); raises ValueError for a text over
        max_length unless truncate."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Embedder.encode: texts must be a list of str")
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=self.truncate,
                             max_length=self.max_length if self.truncate else None)["input_ids"]
        if not self.truncate:
            for i, ids in enumerate(enc):
                if len(ids) > self.max_length:
                    raise ValueError(f"text {i + 1} has {len(ids)} tokens, more than the model's {self.max_length} "
                                     "(pass truncate=True / --truncate to cut it)")
        return enc

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32, *, progress: bool = False) -> Tensor:
        """texts (N strings) -> float32 embeddings (N, d) on the CPU, in input order."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Embedder.encode: batch_size must be a positive int, got {batch_size!r}")
        ids = self.tokenize(texts)
        out = torch.empty(len(ids), self.dim, dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: similar lengths share a batch
        bar = None
        if progress:
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
            e = pool(h, mask, self.pipeline.pooling)  # (b, d) float32
            if self.pipeline.normalize:
                e = torch.nn.functional.normalize(e, p=2, dim=1)
            out[torch.tensor(chunk)] = e.cpu()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if out.numel() and not bool(torch.isfinite(out).all()):
            raise ValueError("Embedder.encode: the model produced non-finite embeddings (try dtype=torch.float32)")
        return out
