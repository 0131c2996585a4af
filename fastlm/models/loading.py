"""fastlm.from_pretrained: a local transformers checkpoint directory, a transformers model
object, or a transformers config (random init) -> a fastlm model.

Weights go through each model's declarative `weight_map()`; whatever is missing,
unexpected or mis-shaped is gathered and raised in one error that lists it all.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from fastlm.models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel
from fastlm.models.common import decode_layout_
from fastlm.models.gpt2 import GPT2LMHeadModel

log = logging.getLogger("fastlm")

MODEL_TYPES = {"gpt2": GPT2LMHeadModel, "bert": BertModel}
HEADS = {
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertForMaskedLM": BertForMaskedLM,
}


class WeightError(ValueError):
    """Checkpoint tensors that do not fit the model: lists every problem at once."""


def _hf_config(src):
    from transformers import PretrainedConfig

    return src if isinstance(src, PretrainedConfig) else None


def _read_config(path: str):
    from transformers import AutoConfig

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"from_pretrained: {cfg_file} not found (a checkpoint directory needs config.json)")
    try:
        with open(cfg_file) as f:
            model_type = json.load(f).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"from_pretrained: {cfg_file} is not valid JSON: {e}") from e
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"from_pretrained: {cfg_file} has model_type {model_type!r}; fastlm supports {', '.join(MODEL_TYPES)}"
        )
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _load_file(path: str) -> dict[str, Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a tensor file
        raise ValueError(f"from_pretrained: could not read weights from {path}: {type(e).__name__}: {e}") from e


def read_checkpoint(path: str) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: safetensors first, then .bin (weights_only)."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if os.path.isfile(os.path.join(path, single)):
            return _load_file(os.path.join(path, single))
        index_file = os.path.join(path, index)
        if os.path.isfile(index_file):
            try:
                with open(index_file) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"from_pretrained: {index_file} is not a valid shard index: {e}") from e
            sd: dict[str, Tensor] = {}
            for shard in shards:
                sd.update(_load_file(os.path.join(path, shard)))
            return sd
    raise FileNotFoundError(
        f"from_pretrained: no weights in {path} (looked for model.safetensors, pytorch_model.bin and their shard indexes)"
    )


def _model_class(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"from_pretrained: model_type {model_type!r} is not supported; fastlm supports {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def convert_state_dict(model: nn.Module, hf: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """transformers tensors -> fastlm's state dict through model.weight_map(); raises one
    WeightError listing every missing, unexpected or mis-shaped tensor."""
    prefixes = model.hf_prefixes()
    norm: dict[str, Tensor] = {}
    for key, t in hf.items():
        k = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        norm[k] = t
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    out: dict[str, Tensor] = {}
    used: set[str] = set(model.optional_hf())
    missing, misshaped = [], []
    for w in model.weight_map():
        absent = [s for s in w.hf if s not in norm]
        if absent:
            missing += absent
            continue
        used.update(w.hf)
        srcs = [norm[s] for s in w.hf]
        if w.how == "copy":
            t = srcs[0]
        elif w.how == "transpose":
            t = srcs[0].t() if srcs[0].dim() == 2 else srcs[0]
        elif w.how == "cat":
            t = torch.cat(srcs, dim=0) if all(s.shape[1:] == srcs[0].shape[1:] for s in srcs) else None
        else:  # pragma: no cover - a bug in a weight map
            raise AssertionError(f"unknown weight-map rule {w.how!r}")
        if t is None or tuple(t.shape) != tuple(expected[w.ours]):
            got = [tuple(s.shape) for s in srcs]
            misshaped.append(f"{', '.join(w.hf)} {got} -> {w.ours} expects {tuple(expected[w.ours])}")
            continue
        out[w.ours] = t.contiguous()
    unexpected = sorted(k for k in norm if k not in used and not model.hf_ignored(k))
    if missing or unexpected or misshaped:
        lines = [f"weights from {source} do not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}):\n    " + "\n    ".join(misshaped))
        raise WeightError("\n".join(lines))
    return out


def _build(cls, config, state: Optional[Mapping[str, Tensor]], source: str, dtype, device):
    model = _build_weights(cls, config, state, source, dtype, device)
    if hasattr(model, "decode_layout_"):  # packs GPT-2's projections on CPU (fastlm.linear.PackedLinear)
        model.decode_layout_()  # later .to(device) calls redo it (GPT2LMHeadModel._apply)
    elif hasattr(model, "decode_linears"):
        decode_layout_(model.decode_linears())
    return model


def _build_weights(cls, config, state: Optional[Mapping[str, Tensor]], source: str, dtype, device):
    """Model of `cls` from config; weights from `state` (HF names) or random init."""
    if state is None:
        model = cls(config).to(device=device or "cpu")
        model.init_random()
        return model.to(dtype=dtype or torch.float32).eval()
    if cls is BertModel:
        has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
        if not has_pooler:
            log.warning("%s has no pooler weights: BertModel is built without a pooler (pooler_output=None)", source)
        with torch.device("meta"):
            model = BertModel(config, add_pooling_layer=has_pooler)
    else:
        with torch.device("meta"):
            model = cls(config)
    sd = convert_state_dict(model, state, source)
    if dtype is None:
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32
    sd = {k: v.to(device=device or "cpu", dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    _retie(model)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # a weight-map bug: every parameter must come from the map
        raise WeightError(f"weights from {source}: no value for {', '.join(leftover)}")
    return model.eval()


def _retie(model: nn.Module) -> None:
    """assign=True loading replaces parameters, so tied ones are tied again here."""
    if isinstance(model, GPT2LMHeadModel) and model.tied:
        model.lm_head.weight = model.wte.weight
    if isinstance(model, BertForMaskedLM):
        model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight


def from_pretrained(
    src: Union[str, os.PathLike, nn.Module, object],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    head: Optional[str] = None,
    quantize: Optional[str] = None,
):
    """Build a fastlm model from `src`:

    - a local transformers checkpoint directory (config.json + safetensors or .bin),
    - a transformers model object (its weights are converted, not shared),
    - a transformers config (random weights, for benchmarks).

    Returns fastlm.GPT2LMHeadModel or fastlm.BertModel by config.model_type; `head`
    ("BertForSequenceClassification" or "BertForMaskedLM") asks for a BERT head model.
    dtype defaults to that of the source weights (float32 for a config).
    quantize: None, "int8" or "int8_dynamic" (see fastlm.quantize); an unknown mode or one without
    a kernel for the device / dtype raises ValueError before the weights are converted.
    """
    from fastlm.quantize import check_mode, check_mode_name, quantize_

    check_mode_name(quantize)
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"from_pretrained: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if device is not None:
        device = torch.device(device)
    state: Optional[Mapping[str, Tensor]] = None
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"from_pretrained: {path} is not a directory (expected a checkpoint directory)")
        config = _read_config(path)
        state, source = read_checkpoint(path), path
    elif isinstance(src, nn.Module) and hasattr(src, "config"):
        config, source = src.config, type(src).__name__
        if any(p.is_meta for p in src.parameters()):
            raise ValueError(f"from_pretrained: the {source} has weights on the meta device; load it with real weights")
        state = src.state_dict()
    elif _hf_config(src) is not None:
        config, source = src, "config"
    else:
        raise TypeError(
            "from_pretrained: src must be a checkpoint directory, a transformers model or a transformers config, "
            f"got {type(src).__name__}"
        )
    cls = _model_class(config)
    if head is not None:
        if head not in HEADS:
            raise ValueError(f"from_pretrained: head must be one of {', '.join(HEADS)}, got {head!r}")
        cls = HEADS[head]
        if config.model_type != cls.model_type:
            raise ValueError(f"from_pretrained: head {head} needs a {cls.model_type} model, got {config.model_type}")
    if quantize is not None:
        src_dtype = next((t.dtype for t in (state or {}).values() if t.is_floating_point()), torch.float32)
        check_mode(quantize, device or torch.device("cpu"), dtype or src_dtype)
    return quantize_(_build(cls, config, state, source, dtype, device), quantize)
