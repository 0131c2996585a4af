"""Test setup. On a machine without CUDA, Triton kernels run under the interpreter:
TRITON_INTERPRET must be set before triton (and so fastlm.kernels) is imported."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTLM_BACKEND", None)  # tests pick backends explicitly
os.environ.setdefault("FASTLM_STRICT", "1")  # no silent fallback to the reference (tests of it turn it off)

import pytest  # noqa: E402

import fastlm  # noqa: E402,F401
from fastlm import backend  # noqa: E402

backend.check_interpreter()  # triton < 3.8 with numpy >= 2.4: a clear error, not 248 failing tests

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device() -> str:
    """Where kernels run: the GPU if there is one, else the CPU through the Triton interpreter."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Every parameter drawn afresh (transformers' init leaves biases 0 and LayerNorm at identity,
    which would hide a dropped bias or LayerNorm weight). LayerNorms (found by type, whatever their
    name: LayerNorm, ln_1, sa_layer_norm, ...) stay near identity so activations keep their scale."""
    with torch.no_grad():
        norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return model


# -- streamed results: one JSON line per test as it finishes (bench/device_check.sh sets
# FASTLM_RESULTS_JSONL), so a run cut by a time limit still says what passed and failed. Written
# by the controlling process only (pytest-xdist workers report through it).
_RESULTS = os.environ.get("FASTLM_RESULTS_JSONL")


def pytest_runtest_logreport(report):
    if not _RESULTS or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or report.outcome != "passed":  # setup errors / skips count too
        import json

        with open(_RESULTS, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                "seconds": round(report.duration, 3)}) + "\n")
