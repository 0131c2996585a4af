"""fastlm.from_pretrained: a local transformers checkpoint directory, a transformers model
object, or a transformers config (random init) -> a fastlm model.

Weights go through each model's declarative `weight_map()`; whatever is missing,
unexpected or mis-shaped is gathered and raised in one error that lists it all.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastlm.models import families as fam
from fastlm.models.bert import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from fastlm.models.common import decode_layout_
from fastlm.models.gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

log = logging.getLogger("fastlm")

# transformers architecture name -> fastlm class; config.architectures picks one, head= overrides
ARCHITECTURES: dict[str, type] = {
    c.__name__: c
    for c in (
        BertModel, BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering,
        BertForMaskedLM,
        fam.RobertaModel, fam.RobertaForSequenceClassification, fam.RobertaForTokenClassification,
        fam.RobertaForQuestionAnswering, fam.RobertaForMaskedLM,
        fam.XLMRobertaModel, fam.XLMRobertaForSequenceClassification, fam.XLMRobertaForTokenClassification,
        fam.XLMRobertaForQuestionAnswering, fam.XLMRobertaForMaskedLM,
        fam.CamembertModel, fam.CamembertForSequenceClassification, fam.CamembertForTokenClassification,
        fam.CamembertForQuestionAnswering, fam.CamembertForMaskedLM,
        fam.DistilBertModel, fam.DistilBertForSequenceClassification, fam.DistilBertForTokenClassification,
        fam.DistilBertForQuestionAnswering, fam.DistilBertForMaskedLM,
        GPT2LMHeadModel, GPT2Model, GPT2ForSequenceClassification,
    )
}
# model_type -> (its architecture names' family, the class built when config.architectures is unset)
MODEL_TYPES: dict[str, type] = {
    "gpt2": GPT2LMHeadModel, "bert": BertModel, "roberta": fam.RobertaModel, "xlm-roberta": fam.XLMRobertaModel,
    "camembert": fam.CamembertModel, "distilbert": fam.DistilBertModel,
}
_FAMILY_OF_TYPE = {"gpt2": "gpt2", "bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta",
                   "camembert": "roberta", "distilbert": "distilbert"}
HEADS = ARCHITECTURES  # the names head= accepts (kept for callers of the old name)


def _family_of_class(cls) -> str:
    if issubclass(cls, (GPT2Model,)):
        return "gpt2"
    base = cls if issubclass(cls, BertModel) else cls.base
    return {"BERT": "bert", "RoBERTa": "roberta", "DistilBERT": "distilbert"}[base.family.name]


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
        f"from_pretrained: no weights in {path} "
        "(looked for model.safetensors, pytorch_model.bin and their shard indexes)"
    )


def _choose_class(config, head: str | None, obj_name: str | None):
    """The fastlm class to build: `head` when given, else the model object's own class name, else
    config.architectures[0], else the model_type's base class."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"from_pretrained: model_type {model_type!r} is not supported; "
                         f"fastlm supports {', '.join(MODEL_TYPES)}")
    supported = ", ".join(ARCHITECTURES)
    if head is not None:
        if head not in ARCHITECTURES:
            raise ValueError(f"from_pretrained: head must be one of {supported}; got {head!r}")
        name, why = head, f"head={head!r}"
    elif obj_name is not None:
        name, why = obj_name, f"the model object is a {obj_name}"
    elif getattr(config, "architectures", None):
        name, why = config.architectures[0], f"config.architectures is {config.architectures}"
    else:
        return MODEL_TYPES[model_type]
    if name not in ARCHITECTURES:
        raise ValueError(f"from_pretrained: {why}, which fastlm does not support; supported architectures: "
                         f"{supported} (pass head= to load the checkpoint into one of them)")
    cls = ARCHITECTURES[name]
    if _family_of_class(cls) != _FAMILY_OF_TYPE[model_type]:
        raise ValueError(f"from_pretrained: {name} cannot load a {model_type!r} checkpoint")
    return cls


def _normalise_keys(model: nn.Module, hf: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint names -> the names weight maps use: legacy LayerNorm.gamma/beta renamed (as
    transformers does) and the base model's prefix ("bert.", "transformer.", ...) removed, so a
    checkpoint saved from any head class (or from the base class) meets the same names."""
    prefixes = model.hf_prefixes()
    norm: dict[str, Tensor] = {}
    for key, t in hf.items():
        k = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        norm[k] = t
    return norm


def _short(names, n: int = 20) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names) - n} more)" if len(names) > n else "")


def convert_state_dict(model: nn.Module, hf: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], list[str]]:
    """transformers tensors -> (fastlm's state dict, names of head weights the checkpoint lacks)
    through model.weight_map().

    - Tensors the model does not use (another head's, a pooler it has not) are skipped, with one
      log line listing them.
    - Head weights (model.head_map()) the checkpoint lacks are returned for random init, as
      transformers does (the caller warns, naming them).
    - A missing base weight or a mis-shaped tensor raises one WeightError listing every problem."""
    norm = _normalise_keys(model, hf)
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    head = {w.ours for w in model.head_map()}
    out: dict[str, Tensor] = {}
    used: set[str] = set(model.optional_hf())
    missing, head_missing, misshaped = [], [], []
    for w in model.weight_map():
        absent = [s for s in w.hf if s not in norm]
        if absent:
            (head_missing if w.ours in head else missing).extend(absent)
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
    unused = sorted(k for k in norm if k not in used and not model.hf_ignored(k))
    if missing or misshaped:
        lines = [f"weights from {source} do not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + _short(missing))
        if unused:
            lines.append(f"  unexpected ({len(unused)}): " + _short(unused))
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}):\n    " + "\n    ".join(misshaped))
        raise WeightError("\n".join(lines))
    if unused:
        log.info("from_pretrained: %s: skipped %d tensors %s does not use: %s", source, len(unused),
                 type(model).__name__, _short(unused))
    return out, head_missing


def _build(cls, config, state: Mapping[str, Tensor] | None, source: str, dtype, device):
    model = _build_weights(cls, config, state, source, dtype, device)
    if hasattr(model, "decode_layout_"):  # packs GPT-2's projections on CPU (fastlm.linear.PackedLinear)
        model.decode_layout_()  # later .to(device) calls redo it (GPT2LMHeadModel._apply)
    elif hasattr(model, "decode_linears"):
        decode_layout_(model.decode_linears())
    return model


def _init_missing(model: nn.Module, names: set[str], std: float, device, dtype) -> None:
    """transformers' init for head parameters the checkpoint lacks: Linear weights normal(0, std),
    biases 0, LayerNorm at identity."""
    for mod_name, mod in model.named_modules():
        for p_name, p in list(mod.named_parameters(recurse=False)):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if full not in names or not p.is_meta:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if isinstance(mod, nn.LayerNorm):
                t.fill_(1.0 if p_name == "weight" else 0.0)
            elif p_name == "weight":
                t.normal_(0.0, std)
            else:
                t.zero_()
            setattr(mod, p_name, nn.Parameter(t, requires_grad=False))


def _build_weights(cls, config, state: Mapping[str, Tensor] | None, source: str, dtype, device):
    """Model of `cls` from config; weights from `state` (HF names) or random init."""
    if state is None:
        model = cls(config).to(device=device or "cpu")
        model.init_random()
        return model.to(dtype=dtype or torch.float32).eval()
    if issubclass(cls, BertModel) and cls.family.name != "DistilBERT":
        has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
        if not has_pooler:
            log.warning("%s has no pooler weights: %s is built without a pooler (pooler_output=None)", source,
                        cls.__name__)
        with torch.device("meta"):
            model = cls(config, add_pooling_layer=has_pooler)
    else:
        with torch.device("meta"):
            model = cls(config)
    _tie_by_checkpoint(model, state, source)
    sd, head_missing = convert_state_dict(model, state, source)
    if dtype is None:
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32
    device = device or torch.device("cpu")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if head_missing:
        new = {w.ours for w in model.head_map() if w.ours not in sd}
        _init_missing(model, new, getattr(config, "initializer_range", 0.02), device, dtype)
        log.warning("from_pretrained: %s has no %s for %s: newly initialised (normal(0, initializer_range), "
                    "as transformers does); train or load them before use", source, _short(head_missing),
                    cls.__name__)
    _retie(model)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # a weight-map bug: every parameter must come from the map
        raise WeightError(f"weights from {source}: no value for {', '.join(leftover)}")
    return model.eval()


def _tie_by_checkpoint(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Tie as transformers does: by what the checkpoint holds. A tied GPT-2 config whose checkpoint
    also stores an lm_head.weight different from wte.weight uses the stored head (untied), with one
    warning; an equal or absent lm_head.weight stays tied. (An untied config without lm_head.weight
    is a missing weight: convert_state_dict raises WeightError, where transformers would
    initialise the head at random.)"""
    if not (isinstance(model, GPT2LMHeadModel) and model.tied):
        return
    head = state.get("lm_head.weight")
    wte = next((state[k] for k in ("transformer.wte.weight", "wte.weight") if k in state), None)
    if head is None or wte is None or (head.shape == wte.shape and torch.equal(head, wte)):
        return
    log.warning("%s: the config ties lm_head to wte (tie_word_embeddings=True), but the checkpoint stores an "
                "lm_head.weight that differs from wte.weight: using the stored lm_head (untied), as transformers "
                "does. Set tie_word_embeddings=False in the config to silence this.", source)
    model.untie_()


def _retie(model: nn.Module) -> None:
    """assign=True loading replaces parameters, so tied ones are tied again here."""
    if isinstance(model, GPT2LMHeadModel) and model.tied:
        model.lm_head.weight = model.wte.weight
    if hasattr(model, "retie"):
        model.retie()


def from_pretrained(
    src: str | os.PathLike | nn.Module | object,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | int | None = None,
    head: str | None = None,
    quantize: str | None = None,
) -> nn.Module:
    """Build a fastlm model from `src`:

    - a local transformers checkpoint directory (config.json + model.safetensors or
      pytorch_model.bin, or their sharded *.index.json),
    - a transformers model object (its weights are converted, not shared),
    - a transformers config (random weights, for benchmarks).

    The class follows the checkpoint: `head` (a transformers architecture name, e.g.
    "BertForSequenceClassification") if given, else the model object's class, else
    config.architectures[0], else the base model of config.model_type (GPT-2: GPT2LMHeadModel).
    Supported: BERT, RoBERTa, XLM-RoBERTa, CamemBERT and DistilBERT as Model / ForSequenceClassification
    / ForTokenClassification / ForQuestionAnswering / ForMaskedLM, and GPT2LMHeadModel, GPT2Model,
    GPT2ForSequenceClassification (fastlm.models.loading.ARCHITECTURES); anything else raises
    ValueError naming them. A checkpoint saved from any head class loads into any of its family:
    tensors the model does not use are skipped (one log line), head weights it lacks are newly
    initialised as transformers does (one warning naming them). Outputs keep transformers' field
    names and tuple order (`out[0]`, `.logits`, `.start_logits`, `.last_hidden_state`, ...).

    dtype: what transformers accepts (torch.float32 / float16 / bfloat16, their names such as
    "float16" or "torch.bfloat16", "auto") plus the short forms "fp32" / "fp16" / "bf16"; None or
    "auto" keeps the source weights' dtype (float32 for a config). device: "cpu", "cuda", "cuda:1",
    a torch.device or a GPU index (default CPU); a GPU this machine does not have raises ValueError
    naming what was asked and what the machine has.
    Raises FileNotFoundError (no config.json / weights), ValueError (unsupported model, unreadable
    files, a dtype / device this machine or fastlm cannot run), WeightError (the weights do not fit),
    TypeError (bad src, dtype or device type).
    quantize: None, "int8" or "int8_dynamic" (see fastlm.quantize); an unknown mode or one without
    a kernel for the device / dtype raises ValueError before the weights are converted.
    """
    from fastlm import _checks
    from fastlm.quantize import check_mode, check_mode_name, quantize_

    check_mode_name(quantize)
    dtype = _checks.model_dtype("from_pretrained", dtype)
    device = _checks.model_device("from_pretrained", device)
    state: Mapping[str, Tensor] | None = None
    obj_name = None
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"from_pretrained: {path} is not a directory (expected a checkpoint directory)")
        config = _read_config(path)
        state, source = read_checkpoint(path), path
    elif isinstance(src, nn.Module) and hasattr(src, "config"):
        config, source = src.config, type(src).__name__
        # the transformers class it is (a user's subclass of BertModel is a BertModel)
        obj_name = next((c.__name__ for c in type(src).__mro__
                         if c.__name__ in ARCHITECTURES and c.__module__.startswith("transformers.")), source)
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
    cls = _choose_class(config, head, obj_name)
    if quantize is not None:
        src_dtype = next((t.dtype for t in (state or {}).values() if t.is_floating_point()), torch.float32)
        check_mode(quantize, device or torch.device("cpu"), dtype or src_dtype)
    model = quantize_(_build(cls, config, state, source, dtype, device), quantize)
    if isinstance(model, GPT2LMHeadModel):
        model.generation_config = _generation_config(src, config)
    elif model.dtype == torch.bfloat16 and model.device.type == "cpu":  # encoders: GEMM-bound
        from fastlm import cpu_features

        cpu_features.warn_if_bf16_emulated(cls.__name__)
    return model


def _generation_config(src, config):
    """The generation defaults transformers would use for `src`: a directory's
    generation_config.json, a model object's generation_config, else those the config implies."""
    import copy

    from transformers import GenerationConfig

    if isinstance(src, (str, os.PathLike)) and os.path.isfile(os.path.join(src, "generation_config.json")):
        try:
            return GenerationConfig.from_pretrained(os.fspath(src), local_files_only=True)
        except (OSError, ValueError) as e:
            where = os.path.join(src, "generation_config.json")
            raise ValueError(f"from_pretrained: could not read {where}: {e}") from e
    if isinstance(src, nn.Module) and getattr(src, "generation_config", None) is not None:
        return copy.deepcopy(src.generation_config)
    return GenerationConfig.from_model_config(config)
