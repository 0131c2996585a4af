"""fastlm: fast BERT and GPT-2 inference with fused Triton attention, CUDA FFN kernels and
CUDA-graph decoding. See DESIGN.md for the contract."""

import logging

from fastlm import _ext  # noqa: F401  (first: loads fastlm._C, which defines torch.ops.fastlm)
from fastlm import nn, ops, reference
from fastlm.backend import use_backend
from fastlm.integrations import optimize, restore
from fastlm.models import *  # noqa: F401,F403  (every supported architecture, from_pretrained, WeightError)
from fastlm.models import ARCHITECTURES, WeightError, from_pretrained  # noqa: F401

__version__ = "0.1.0"
logging.getLogger("fastlm").addHandler(logging.NullHandler())

__all__ = [
    "nn",
    "ops",
    "reference",
    "use_backend",
    "optimize",
    "restore",
    "from_pretrained",
    *ARCHITECTURES,
    "WeightError",
    "__version__",
]
