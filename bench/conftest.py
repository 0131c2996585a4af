"""pytest-benchmark suite over fastlm.bench's cases: `pytest bench/ --benchmark-only`.
Shapes follow the device (full on GPU, small on CPU; FASTLM_BENCH_DEVICE=cpu|cuda picks one).
No correctness asserts here."""

import os

import pytest
import torch

DEVICE = os.environ.get("FASTLM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
    os.environ.get("FASTLM_BENCH_DTYPE", "fp16" if DEVICE == "cuda" else "fp32")
]


@pytest.fixture
def device():
    return DEVICE
