"""fastlm: fast BERT and GPT-2 inference with fused Triton attention, CUDA FFN kernels and
CUDA-graph decoding. See docs/design.md for the contracts."""

import logging

from fastlm import (
    _ext,  # noqa: F401  (first: loads fastlm._C, which defines torch.ops.fastlm)
    models,
    native_memory,  # noqa: F401  (caps oneDNN's caches on import, before any model runs: native_memory.py)
    nn,
    ops,
    reference,
)
from fastlm.backend import use_backend
from fastlm.embed import Embedder
from fastlm.integrations import is_optimized, optimize, restore
from fastlm.models import *  # noqa: F403  (every model class, ARCHITECTURES, WeightError, from_pretrained)
from fastlm.quantize import quantize_

__version__ = "0.1.0"
logging.getLogger("fastlm").addHandler(logging.NullHandler())

__all__ = [
    "nn",
    "ops",
    "reference",
    "use_backend",
    "optimize",
    "is_optimized",
    "Embedder",
    "restore",
    "quantize_",
    "__version__",
]
__all__ += models.__all__  # the model classes, ARCHITECTURES, WeightError, from_pretrained


def __getattr__(name):
    """fastlm.distributed / fastlm.jobs on first use (`import fastlm` alone reads neither; neither
    imports Ray)."""
    if name in ("distributed", "jobs"):
        import importlib

        return importlib.import_module(f"fastlm.{name}")
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
