"""Reading a sentence-transformers checkpoint directory the way sentence-transformers 6 does, for
fastlm.Embedder.

Every file and key that sentence-transformers reads for a text pipeline of Transformer, Pooling and
the modules after it is either applied here as sentence-transformers applies it, or refused with a
ValueError naming the file and the key (or the module type). Nothing is dropped silently:

- modules.json: the module list, in order. Transformer (first, once), Pooling (once, after it), then
  any of Dense, LayerNorm, Dropout (identity at inference) and Normalize, each reading and writing the
  sentence embedding. A class outside sentence_transformers (custom code: sentence-transformers
  needs trust_remote_code) or any other module type (Router, CNN, LSTM, WordEmbeddings, ...) is
  refused; so is a path leaving the directory, a missing Transformer or Pooling. A module's name,
  idx and kwargs (the encode keyword arguments forwarded to it, e.g. a Router's task: Embedder.encode
  forwards none) change nothing.
- The Transformer's sentence_bert_config.json (or the legacy sentence_<family>_config.json names),
  read from the Transformer's own folder: max_seq_length (the tokenizer's model_max_length),
  do_lower_case (a Lowercase normalizer in front of the tokenizer's), tokenizer_args /
  processor_kwargs (passed to the tokenizer), model_args / model_kwargs (dtype applied; keys that
  cannot change the numbers accepted; others refused), config_args / config_kwargs (only use_cache,
  which an encoder does not read; others refused), processing_kwargs (the text / common call
  arguments max_length, truncation, padding, add_special_tokens; the image / audio / video /
  chat_template ones are for other inputs), transformer_task (feature-extraction only),
  modality_config / module_output_name (the text -> last_hidden_state -> token_embeddings default
  only), unpad_inputs (speed only), query_length / document_length / query_expansion (used by
  encode_query / encode_document only, never by encode). An unknown key is refused, as
  sentence-transformers' Transformer refuses it.
- tokenizer_config.json: read by the tokenizer itself; its model_max_length is the sequence limit
  unless max_seq_length or the tokenizer arguments set it, capped at the model's positions, as
  sentence-transformers does (fastlm.Embedder applies this).
- config_sentence_transformers.json: prompts (a null prompt is ""), default_prompt_name,
  truncate_dim, similarity_fn_name (kept as metadata: encode does not use it), model_type
  (SentenceTransformer only: another type is converted by sentence-transformers to different
  modules), requirements (checked like sentence-transformers: an unmet one is refused; the
  sentence_transformers entry is skipped, fastlm stands in for it), __version__ (metadata). Other
  keys are not read by sentence-transformers either.
- The Pooling config.json: embedding_dimension (legacy word_embedding_dimension; must equal the
  encoder's hidden size), pooling_mode or the legacy pooling_mode_* booleans, include_prompt.
- Dense config.json + weights: in_features, out_features, bias, activation_function (a torch.nn
  module class by its full name, built without arguments, as sentence-transformers does without
  trust_remote_code; any other name is refused where sentence-transformers would fall back to Tanh
  with a warning), use_residual, module_input_name / module_output_name (sentence_embedding only).
- LayerNorm config.json (dimension) + weights; Dropout config.json (dropout); Normalize config.json
  (module_input_name / module_output_name: sentence_embedding only).

A directory without modules.json is a plain transformers checkpoint: sentence-transformers reads
none of the files above for it (only the tokenizer's), and pools with mean, or lasttoken for a
*ForCausalLM architecture.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING = {  # sentence-transformers' pooling_mode_* keys, in its concatenation order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
DEFAULT_PROMPTS = {"query": "", "document": ""}  # sentence-transformers' defaults (empty: no prompt)

# sentence_bert_config.json: the file names sentence-transformers tries, in its order
SBERT_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                      "sentence_camembert_config.json", "sentence_albert_config.json",
                      "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "LayerNorm", "Dropout", "Normalize")
# keys that locate files on the Hub; sentence-transformers overrides them with its own loading arguments
_HUB_KEYS = {"subfolder", "token", "cache_dir", "revision", "local_files_only", "trust_remote_code",
             "use_auth_token"}
# model_kwargs that cannot change the embeddings (how the weights are loaded or placed, the attention
# kernel, the unused pooler layer)
_INERT_MODEL_KWARGS = {"attn_implementation", "low_cpu_mem_usage", "device_map", "use_safetensors",
                       "add_pooling_layer", "use_cache", "_fast_init", "offload_folder", "offload_state_dict"}
_TEXT_CALL_KWARGS = {"max_length", "truncation", "padding", "add_special_tokens", "return_tensors"}
_DEFAULT_MODALITY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
SIMILARITY_FN_NAMES = ("cosine", "dot", "euclidean", "manhattan")


def read_json(path: str):
    """A JSON file's content; ValueError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Embedder: cannot read {path}: {e}") from e


def _refuse(file: str, key: str, why: str) -> ValueError:
    return ValueError(f"Embedder: {file}: {key} {why}")


def pooling_modes(cfg: dict) -> tuple[str, ...]:
    """A sentence-transformers Pooling config -> its modes (legacy pooling_mode_* booleans or the
    newer `pooling_mode` string / list, which wins over them); none set means mean, as
    sentence-transformers does."""
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for k, m in _LEGACY_POOLING.items() if cfg.get(k, False)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"Embedder: pooling mode {bad[0] if bad else modes!r} is not supported "
                         f"(supported: {', '.join(POOLING_MODES)})")
    return modes


@dataclass
class Step:
    """One sentence-transformers module after Pooling, applied to the (b, d) sentence embeddings."""

    kind: str  # "Dense" | "LayerNorm" | "Dropout" | "Normalize"
    module: nn.Module | None  # the Dense / LayerNorm computation (float32, CPU); None for the others
    out_dim: int | None  # the dimension it outputs (None: unchanged)
    source: str  # its folder, for messages


class _Dense(nn.Module):
    """sentence-transformers' Dense: activation(linear(x)), plus x (or a projection of x) with use_residual."""

    def __init__(self, linear: nn.Linear, activation: nn.Module, residual: nn.Linear | None, use_residual: bool):
        super().__init__()
        self.linear, self.activation, self.residual, self.use_residual = linear, activation, residual, use_residual

    def forward(self, x):
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


@dataclass
class Pipeline:
    """What a checkpoint directory asks for (see the module docstring for where each field comes from)."""

    model_dir: str
    pooling: tuple[str, ...]
    normalize: bool  # a Normalize module at the end of the pipeline
    max_seq_length: int | None
    include_prompt: bool = True  # the Pooling config's include_prompt: False pools without the prompt's tokens
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    default_prompt_name: str | None = None
    do_lower_case: bool = False
    tokenizer_kwargs: dict = field(default_factory=dict)  # for AutoTokenizer.from_pretrained
    call_kwargs: dict = field(default_factory=dict)  # processing_kwargs for the tokenizer call
    model_dtype: str | None = None  # model_kwargs' dtype / torch_dtype
    steps: list[Step] = field(default_factory=list)  # modules after Pooling, less a trailing Normalize
    pooling_dim: int | None = None  # the Pooling config's embedding_dimension
    truncate_dim: int | None = None
    similarity_fn_name: str | None = None
    sbert_config: str | None = None  # the sentence_bert_config.json read, for messages


def _check_relative(modules_file: str, i: int, rel) -> str:
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise _refuse(modules_file, f"module {i} path", f"must be a folder inside the checkpoint, got {rel!r}")
    return rel


def _module_kind(modules_file: str, i: int, ref) -> str:
    if not isinstance(ref, str) or not ref.startswith("sentence_transformers."):
        raise _refuse(modules_file, f"module {i} type",
                      f"{ref!r} is not a sentence_transformers class (custom code, which sentence-transformers "
                      "imports only with trust_remote_code); fastlm does not run it")
    kind = ref.rsplit(".", 1)[-1]
    if kind not in SUPPORTED_MODULES:
        raise _refuse(modules_file, f"module {i} type", f"{ref!r}: fastlm does not run a {kind} module "
                      f"(supported: {', '.join(SUPPORTED_MODULES)})")
    return kind


def _check_keys(file: str, cfg: dict, allowed) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"Embedder: {file} must hold a JSON object, got {type(cfg).__name__}")
    for k in cfg:
        if k not in allowed:
            raise _refuse(file, repr(k), "is not a setting fastlm knows how to apply "
                          f"(known: {', '.join(sorted(allowed))})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(file: str, key: str, v, optional: bool = True) -> int | None:
    if v is None and optional:
        return None
    if not _is_int(v) or v < 1:
        raise _refuse(file, key, f"must be a positive integer{' or null' if optional else ''}, got {v!r}")
    return v


def _kwargs_dict(file: str, key: str, v) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _refuse(file, key, f"must be an object, got {type(v).__name__}")
    return {k: x for k, x in v.items() if k not in _HUB_KEYS}


def _read_transformer(pipe: Pipeline, folder: str) -> None:
    """The Transformer module's sentence_bert_config.json, as Transformer.load reads it."""
    file = next((os.path.join(folder, n) for n in SBERT_CONFIG_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if file is None:
        return
    cfg = read_json(file)
    if not cfg:  # sentence-transformers tries the next name when a file is empty ({}); nothing to apply
        return
    allowed = {"max_seq_length", "do_lower_case", "model_args", "model_kwargs", "tokenizer_args", "processor_kwargs",
               "config_args", "config_kwargs", "processing_kwargs", "transformer_task", "modality_config",
               "module_output_name", "unpad_inputs", "query_length", "document_length", "query_expansion",
               "tokenizer_name_or_path", "backend"}
    _check_keys(file, cfg, allowed)
    pipe.sbert_config = file
    pipe.max_seq_length = _positive_int(file, "max_seq_length", cfg.get("max_seq_length"))
    lower = cfg.get("do_lower_case", False)
    if not isinstance(lower, bool):
        raise _refuse(file, "do_lower_case", f"must be true or false, got {lower!r}")
    pipe.do_lower_case = lower
    for old, new in (("model_args", "model_kwargs"), ("tokenizer_args", "processor_kwargs"),
                     ("config_args", "config_kwargs")):
        if old in cfg and new in cfg:
            raise _refuse(file, f"{old} / {new}", "are both set (sentence-transformers keeps only one: ambiguous)")
    tok = _kwargs_dict(file, "processor_kwargs", cfg.get("processor_kwargs", cfg.get("tokenizer_args")))
    pipe.tokenizer_kwargs = tok
    model_kwargs = _kwargs_dict(file, "model_kwargs", cfg.get("model_kwargs", cfg.get("model_args")))
    for k, v in model_kwargs.items():
        if k in ("dtype", "torch_dtype"):
            if not isinstance(v, str):
                raise _refuse(file, f"model_kwargs.{k}", f"must be a dtype name, got {v!r}")
            pipe.model_dtype = v
        elif k not in _INERT_MODEL_KWARGS:
            raise _refuse(file, f"model_kwargs.{k}", "changes how transformers builds the model; fastlm does not "
                          "apply it (supported: dtype / torch_dtype and settings that do not change the numbers: "
                          f"{', '.join(sorted(_INERT_MODEL_KWARGS))})")
    config_kwargs = _kwargs_dict(file, "config_kwargs", cfg.get("config_kwargs", cfg.get("config_args")))
    for k in config_kwargs:
        if k != "use_cache":
            raise _refuse(file, f"config_kwargs.{k}", "overrides the model's config.json; fastlm builds the "
                          "model from config.json alone (edit config.json instead)")
    task = cfg.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise _refuse(file, "transformer_task", f"is {task!r}; fastlm.Embedder runs feature-extraction only")
    if cfg.get("modality_config") not in (None, _DEFAULT_MODALITY):
        raise _refuse(file, "modality_config", f"is {cfg['modality_config']!r}; fastlm.Embedder runs text through "
                      f"forward -> last_hidden_state only ({_DEFAULT_MODALITY!r})")
    if cfg.get("module_output_name") not in (None, "token_embeddings"):
        raise _refuse(file, "module_output_name", f"is {cfg['module_output_name']!r}; fastlm.Embedder supports "
                      "'token_embeddings' only")
    # "backend": sentence-transformers replaces it with its own loading argument (no effect)
    if cfg.get("tokenizer_name_or_path") is not None:
        raise _refuse(file, "tokenizer_name_or_path", "loads the tokenizer from elsewhere; fastlm reads the "
                      "tokenizer of the Transformer's folder only (save the tokenizer there)")
    unpad = cfg.get("unpad_inputs")
    if unpad not in (None, True, False):
        raise _refuse(file, "unpad_inputs", f"must be true, false or null, got {unpad!r}")
    for key in ("query_length", "document_length"):
        _positive_int(file, key, cfg.get(key))  # encode_query / encode_document only: encode never reads them
    if cfg.get("query_expansion") is not None and not isinstance(cfg["query_expansion"], dict):
        raise _refuse(file, "query_expansion", "must be an object or null")
    pipe.call_kwargs = _processing_kwargs(file, cfg.get("processing_kwargs"))


def _processing_kwargs(file: str, pk) -> dict:
    """processing_kwargs -> the keyword arguments of the tokenizer call ({**text, **common}, as
    sentence-transformers merges them for a tokenizer)."""
    if pk is None:
        return {}
    if not isinstance(pk, dict):
        raise _refuse(file, "processing_kwargs", f"must be an object, got {type(pk).__name__}")
    for key, v in pk.items():
        if key in ("image", "audio", "video", "chat_template"):  # other inputs / the message modality
            continue
        if key not in ("text", "common"):
            raise _refuse(file, f"processing_kwargs.{key}", "is not a processing_kwargs section (text, common, "
                          "image, audio, video, chat_template)")
        if not isinstance(v, dict):
            raise _refuse(file, f"processing_kwargs.{key}", f"must be an object, got {type(v).__name__}")
        for k in v:
            if k not in _TEXT_CALL_KWARGS:
                raise _refuse(file, f"processing_kwargs.{key}.{k}", "is a tokenizer call argument fastlm does not "
                              f"apply (supported: {', '.join(sorted(_TEXT_CALL_KWARGS))})")
    merged = {**(pk.get("text") or {}), **(pk.get("common") or {})}
    merged.pop("return_tensors", None)
    where = "processing_kwargs"
    if "max_length" in merged:
        _positive_int(file, f"{where}.max_length", merged["max_length"], optional=False)
    if merged.get("truncation", True) not in (True, "longest_first", "only_first"):
        raise _refuse(file, f"{where}.truncation", f"is {merged['truncation']!r}; fastlm truncates (or refuses) "
                      "texts over the limit, as truncation=True does")
    if merged.get("padding", True) not in (True, "longest", "max_length"):
        raise _refuse(file, f"{where}.padding", f"is {merged['padding']!r}; fastlm pads batches (true / "
                      "'longest' / 'max_length' give the same embeddings)")
    if not isinstance(merged.get("add_special_tokens", True), bool):
        raise _refuse(file, f"{where}.add_special_tokens", "must be true or false")
    return {k: merged[k] for k in ("max_length", "add_special_tokens") if k in merged}


def _read_pooling(pipe: Pipeline, folder: str) -> None:
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"Embedder: the Pooling module has no {file} (sentence-transformers needs its "
                         "embedding_dimension)")
    cfg = read_json(file)
    _check_keys(file, cfg, {"embedding_dimension", "word_embedding_dimension", "pooling_mode", "include_prompt",
                            *_LEGACY_POOLING})
    dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    pipe.pooling_dim = _positive_int(file, "embedding_dimension", dim, optional=False)
    mode = cfg.get("pooling_mode")
    if "pooling_mode" in cfg and not (isinstance(mode, str) or (isinstance(mode, list) and mode
                                                               and all(isinstance(m, str) for m in mode))):
        raise _refuse(file, "pooling_mode", f"must be a mode name or a non-empty list of them, got {mode!r}")
    for k in _LEGACY_POOLING:
        if k in cfg and not isinstance(cfg[k], bool):
            raise _refuse(file, k, f"must be true or false, got {cfg[k]!r}")
    try:
        pipe.pooling = pooling_modes(cfg)
    except ValueError as e:
        raise ValueError(f"{e} ({file}: pooling_mode)") from None
    inc = cfg.get("include_prompt", True)
    if not isinstance(inc, bool):
        raise _refuse(file, "include_prompt", f"must be true or false, got {inc!r}")
    pipe.include_prompt = inc


def _io_names(file: str, cfg: dict) -> None:
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key) not in (None, "sentence_embedding"):
            raise _refuse(file, key, f"is {cfg[key]!r}; fastlm applies this module to the sentence embedding only")


def _weights(folder: str, kind: str) -> dict:
    from safetensors.torch import load_file

    st, binf = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    try:
        if os.path.isfile(st):
            return load_file(st)
        if os.path.isfile(binf):
            return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"Embedder: cannot read the {kind} weights in {folder}: {type(e).__name__}: {e}") from e
    raise ValueError(f"Embedder: the {kind} module in {folder} has no model.safetensors or pytorch_model.bin")


def _load_into(module: nn.Module, folder: str, kind: str) -> nn.Module:
    sd = _weights(folder, kind)
    expect = module.state_dict()
    missing, unexpected = sorted(set(expect) - set(sd)), sorted(set(sd) - set(expect))
    if missing or unexpected:
        raise ValueError(f"Embedder: the {kind} weights in {folder} do not fit its config.json "
                         f"(missing {missing}, unexpected {unexpected})")
    for k, t in expect.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ValueError(f"Embedder: the {kind} weight {k} in {folder} has shape {tuple(sd[k].shape)}, "
                             f"its config.json asks for {tuple(t.shape)}")
    module.load_state_dict({k: v.float() for k, v in sd.items()})
    return module.eval()


def _activation(file: str, name) -> nn.Module:
    """A Dense activation_function, as sentence-transformers builds it without trust_remote_code: a
    torch.nn.Module class named by its full dotted path, instantiated without arguments."""
    if not isinstance(name, str) or not name.startswith("torch."):
        raise _refuse(file, "activation_function", f"is {name!r}: not a torch.nn module class (sentence-transformers "
                      "would fall back to Tanh with a warning unless trust_remote_code; fastlm refuses)")
    module_path, _, cls_name = name.rpartition(".")
    try:
        try:
            obj = getattr(importlib.import_module(name), cls_name)  # as import_from_string tries first
        except Exception:
            obj = getattr(importlib.import_module(module_path), cls_name)
    except Exception as e:
        raise _refuse(file, "activation_function", f"{name!r} cannot be imported: {e}") from None
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise _refuse(file, "activation_function", f"{name!r} is not a torch.nn.Module class")
    return obj()


def _read_dense(folder: str, dim: int) -> Step:
    file = os.path.join(folder, "config.json")
    cfg = read_json(file) if os.path.isfile(file) else {}
    _check_keys(file, cfg, {"in_features", "out_features", "bias", "activation_function", "module_input_name",
                            "module_output_name", "use_residual"})
    fin = _positive_int(file, "in_features", cfg.get("in_features"), optional=False)
    fout = _positive_int(file, "out_features", cfg.get("out_features"), optional=False)
    if fin != dim:
        raise _refuse(file, "in_features", f"is {fin}, but the embeddings reaching this Dense have {dim} dimensions")
    bias, res = cfg.get("bias", True), cfg.get("use_residual", False)
    for key, v in (("bias", bias), ("use_residual", res)):
        if not isinstance(v, bool):
            raise _refuse(file, key, f"must be true or false, got {v!r}")
    _io_names(file, cfg)
    act = _activation(file, cfg["activation_function"]) if "activation_function" in cfg else nn.Tanh()
    residual = nn.Linear(fin, fout, bias=False) if res and fin != fout else None
    dense = _Dense(nn.Linear(fin, fout, bias=bias), act, residual, res)
    # the state dict keys of sentence-transformers' Dense: linear.*, residual.weight
    holder = nn.Module()
    holder.linear = dense.linear
    if residual is not None:
        holder.residual = residual
    _load_into(holder, folder, "Dense")
    return Step("Dense", dense.eval(), fout, folder)


def _read_layer_norm(folder: str, dim: int) -> Step:
    file = os.path.join(folder, "config.json")
    cfg = read_json(file) if os.path.isfile(file) else {}
    _check_keys(file, cfg, {"dimension"})
    d = _positive_int(file, "dimension", cfg.get("dimension"), optional=False)
    if d != dim:
        raise _refuse(file, "dimension", f"is {d}, but the embeddings reaching this LayerNorm have {dim} dimensions")
    holder = nn.Module()
    holder.norm = nn.LayerNorm(d)
    _load_into(holder, folder, "LayerNorm")
    return Step("LayerNorm", holder.norm, None, folder)


def _read_config_st(pipe: Pipeline, path: str) -> None:
    """config_sentence_transformers.json, as SentenceTransformer._parse_model_config reads it."""
    file = os.path.join(path, "config_sentence_transformers.json")
    if not os.path.isfile(file):
        return
    cfg = read_json(file)
    if not isinstance(cfg, dict):
        raise ValueError(f"Embedder: {file} must hold a JSON object")
    model_type = cfg.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise _refuse(file, "model_type", f"is {model_type!r}; sentence-transformers converts such a model to "
                      "different modules when loading it as a SentenceTransformer, which fastlm does not do")
    _check_requirements(file, cfg.get("requirements"))
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict):
        raise _refuse(file, "prompts", f"must be an object of name -> prompt, got {type(prompts).__name__}")
    for name, text in prompts.items():
        if text is not None and not isinstance(text, str):
            raise _refuse(file, f"prompts.{name}", f"must be a string or null, got {text!r}")
        pipe.prompts[name] = text or ""  # sentence-transformers turns a null prompt into ""
    default = cfg.get("default_prompt_name")
    if default is not None and not isinstance(default, str):
        raise _refuse(file, "default_prompt_name", f"must be a string or null, got {default!r}")
    pipe.default_prompt_name = default
    pipe.truncate_dim = _positive_int(file, "truncate_dim", cfg.get("truncate_dim"))
    sim = cfg.get("similarity_fn_name")
    if sim is not None and not isinstance(sim, str):
        raise _refuse(file, "similarity_fn_name", f"must be a string or null, got {sim!r}")
    # sentence-transformers keeps only the single-vector names (others, e.g. maxsim, fall back to cosine)
    pipe.similarity_fn_name = sim if sim in SIMILARITY_FN_NAMES else None


def _check_requirements(file: str, req) -> None:
    """The `requirements` block: package -> version specifier (or {"specifier", "reason"}), checked as
    sentence-transformers checks it (an unparsable one is skipped); sentence_transformers itself is
    skipped, since fastlm runs the model in its place."""
    if not req or not isinstance(req, dict):
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    unmet = []
    for name, spec in req.items():
        name = {"pytorch": "torch"}.get(name, name)
        if name.replace("-", "_") == "sentence_transformers":
            continue
        reason = spec.get("reason", "") if isinstance(spec, dict) else ""
        spec = spec.get("specifier", "") if isinstance(spec, dict) else spec
        if not isinstance(spec, str):
            continue
        if name == "python":
            have = platform.python_version()
        else:
            try:
                have = version(name)
            except PackageNotFoundError:
                have = None
        try:
            if have is not None and SpecifierSet(spec, prereleases=True).contains(Version(have)):
                continue
        except Exception:
            continue
        unmet.append(f"{name}{spec} ({name} {have or 'is not installed'}){': ' + reason if reason else ''}")
    if unmet:
        raise _refuse(file, "requirements", "are not met: " + "; ".join(unmet))


def read_pipeline(path: str, hidden_size: int | None = None) -> Pipeline:
    """The modules and settings of a sentence-transformers directory, or a plain transformers one
    (mean pooling; lasttoken for a *ForCausalLM architecture). `hidden_size` (the encoder's)
    checks the Pooling's embedding_dimension and sizes the Dense / LayerNorm chain; when None it is
    read from the Transformer folder's config.json. Raises FileNotFoundError for a missing
    directory, ValueError naming the file and key of a setting fastlm cannot apply."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Embedder: {path} is not a directory (expected a checkpoint directory)")
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return Pipeline(path, _plain_pooling(path), False, None)
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"Embedder: {modules_file} must hold a list of module objects")
    kinds = []
    for i, m in enumerate(modules):
        if "type" not in m or "path" not in m:
            raise _refuse(modules_file, f"module {i}", "needs a 'type' and a 'path'")
        kinds.append((_module_kind(modules_file, i, m["type"]), os.path.join(path, _check_relative(modules_file, i,
                                                                                                    m["path"]))))
    names = [k for k, _ in kinds]
    if names[:1] != ["Transformer"] or names.count("Transformer") != 1:
        raise _refuse(modules_file, "modules", f"must start with the one Transformer module, got {names}")
    if names.count("Pooling") != 1 or names[1] != "Pooling":
        raise _refuse(modules_file, "modules", "need one Pooling module right after the Transformer (the sentence "
                      f"embedding is pooled from the token embeddings), got {names}")
    pipe = Pipeline(kinds[0][1], ("mean",), False, None)
    _read_transformer(pipe, kinds[0][1])
    _read_pooling(pipe, kinds[1][1])
    if hidden_size is None:
        hidden_size = _hidden_size(pipe.model_dir)
    if hidden_size is not None and pipe.pooling_dim != hidden_size:
        raise _refuse(os.path.join(kinds[1][1], "config.json"), "embedding_dimension",
                      f"is {pipe.pooling_dim}, but the encoder's hidden size is {hidden_size}")
    pipe.steps = build_steps(kinds[2:], (hidden_size or pipe.pooling_dim) * len(pipe.pooling))
    if pipe.steps and pipe.steps[-1].kind == "Normalize":
        pipe.steps.pop()
        pipe.normalize = True
    _read_config_st(pipe, path)
    return pipe


def build_steps(kinds: list[tuple[str, str]], dim: int) -> list[Step]:
    """The modules after Pooling ((kind, folder) pairs) as Steps, starting from `dim` pooled dimensions."""
    steps = []
    for kind, folder in kinds:
        if kind == "Dense":
            step = _read_dense(folder, dim)
        elif kind == "LayerNorm":
            step = _read_layer_norm(folder, dim)
        elif kind in ("Normalize", "Dropout"):
            file = os.path.join(folder, "config.json")
            cfg = read_json(file) if os.path.isfile(file) else {}
            if kind == "Normalize":
                _check_keys(file, cfg, {"module_input_name", "module_output_name"})
                _io_names(file, cfg)
            else:
                _check_keys(file, cfg, {"dropout"})  # identity at inference
            step = Step(kind, None, None, folder)
        else:
            raise ValueError(f"Embedder: a {kind} module ({folder}) must come right after the Transformer")
        dim = step.out_dim or dim
        steps.append(step)
    return steps


def _hidden_size(model_dir: str) -> int | None:
    file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(file):
        return None
    cfg = read_json(file)
    v = cfg.get("hidden_size", cfg.get("n_embd", cfg.get("dim")))
    return v if _is_int(v) else None


def _plain_pooling(path: str) -> tuple[str, ...]:
    """sentence-transformers' default for a plain transformers directory: lasttoken for a model
    designed for causal language modelling (architectures[0] ends in ForCausalLM, is_causal not
    false), else mean."""
    file = os.path.join(path, "config.json")
    cfg = read_json(file) if os.path.isfile(file) else {}
    arch = cfg.get("architectures") if isinstance(cfg, dict) else None
    if arch and isinstance(arch[0], str) and arch[0].endswith("ForCausalLM") and cfg.get("is_causal", True):
        return ("lasttoken",)
    return ("mean",)
