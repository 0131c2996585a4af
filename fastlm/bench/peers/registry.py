"""The engines of the peers suite: one line per engine, the module under fastlm/bench/peers/ that
defines ENGINE (a fastlm.bench.peers.base.Engine). The order is the order of the rows."""

from __future__ import annotations

import importlib
from functools import cache

from fastlm.bench.peers.base import Engine

ENGINE_MODULES = (
    "ctranslate2_engine",
    "fastlm_engine",
    "transformers_engine",
    "onnxruntime_engine",  # BERT only
    "openvino_engine",  # the CPU plugin's default math (bf16 on CPUs with AVX512_BF16 / AMX)
    "openvino_f32_engine",  # the same models with INFERENCE_PRECISION_HINT=f32
    "llamacpp_engine",  # GPT-2 only; llama-cpp-python builds from source
)
PRECISIONS = ("fp32", "int8", "bf16")  # rows precision by precision, each over the engines that have it


@cache
def engines() -> dict[str, Engine]:
    """name -> engine, in ENGINE_MODULES order. Importing an engine module imports no engine
    library: that happens in missing(), version() and the worker."""
    out: dict[str, Engine] = {}
    for mod in ENGINE_MODULES:
        engine = importlib.import_module(f"fastlm.bench.peers.{mod}").ENGINE
        out[engine.name] = engine
    return out


def providers() -> list[tuple[str, str, str]]:
    """(provider, engine name, precision) of every row of a peers case, in order: the fp32 rows of
    every engine, then the int8 rows, then the bf16 rows (fastlm's dtype=torch.bfloat16; OpenVINO's
    default rows already name the bf16 math they ran). The provider is the engine's name, +
    "_<precision>" but for fp32."""
    return [(e.name if p == "fp32" else f"{e.name}_{p}", e.name, p)
            for p in PRECISIONS for e in engines().values() if p in e.precisions]
