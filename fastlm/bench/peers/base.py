"""Engine: the interface every engine of the peers suite implements.

An engine is one module, fastlm/bench/peers/<name>_engine.py, defining `ENGINE = <Engine subclass>()`,
and one line in fastlm/bench/peers/registry.py. The suite asks it, in the parent process, whether
it can run here (`missing`) and its version; in a worker process of its own (fastlm.bench.peers.worker)
it prepares the model once (`prepare`: convert, export, quantize) and builds the callable that is
timed (`runner`). An engine that is not installed, or that cannot prepare or run a workload, gives
skipped rows with the reason (raise `fastlm.bench.result.Skip(reason)`), never a crash of the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# torch's and fastlm's caps (docs/design.md, .ci/avx2_subset): fastlm._C's kernels, oneDNN inside
# torch, ATen's vectorised kernels
TORCH_AVX2 = {"FASTLM_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ISAS = ("avx2",)  # the ISAs `fastlm bench --isa` can force


class Engine:
    """One engine of the peers suite. Subclasses set the attributes and implement `runner`."""

    name: str = ""  # provider of its rows: NAME for fp32, NAME_<precision> for the others
    title: str = ""  # its name in the table and the plot, e.g. "CTranslate2"
    module: str | None = None  # the Python module it needs (None: always there)
    install: str = ""  # how to install it, e.g. "pip install 'fastlm[peers]'"
    optional: bool = True  # an outside engine: a plain `fastlm bench` runs the peers only when one is installed
    precisions: tuple[str, ...] = ("fp32", "int8")  # the rows it has (see registry.PRECISIONS)
    prepares: bool = False  # prepare() has work to do: the suite runs it once per workload, in its own process
    batch_decode: bool = False  # its runner takes the batched-decode workloads (gpt2_bB: ids (B, prompt))

    def isa_cap(self, isa: str) -> dict:
        """How this engine's kernels are capped at `isa` ("avx2": the AVX2 + FMA paths an AVX-512 CPU
        can be made to run, to stand in for an AVX2-only CPU) in its worker process: {"env": the
        variables that cap it, "forced": "yes" | "partly" | "no" | "skip", "note": how far the cap
        reaches (or, with "skip", why its rows do not run capped)}. The default: no cap exists, its
        rows run its native kernels and the table says so."""
        return {"env": {}, "forced": "no", "note": "no way to cap its kernels: it runs the CPU's native ISA"}

    def missing(self) -> str | None:
        """Why this engine cannot run here, or None when it can. Only imports `module`."""
        if self.module is None:
            return None
        try:
            importlib.import_module(self.module)
        except ImportError:
            return f"{self.module} is not installed ({self.install})" if self.install else \
                f"{self.module} is not installed"
        except Exception as e:  # installed but broken (a missing shared library, ...)
            return f"{self.module} does not import: {type(e).__name__}: {str(e)[:120]}"
        return None

    def version(self) -> str | None:
        """The engine's version, None when it is missing."""
        if self.module is None or self.missing():
            return None
        return str(getattr(importlib.import_module(self.module), "__version__", "unknown"))

    def label(self, precision: str) -> str:
        """The engine's name in the row of `precision` (the table's engine column)."""
        return self.title

    def math(self, precision: str) -> str:
        """The math it runs for `precision` (the table's precision column): the precision, then any
        detail in parentheses, e.g. "int8 (Q8_0)" for a quantized file type; the plot keeps the part
        before " (". """
        return precision

    def ran_math(self) -> str | None:
        """The math the model set up by the last runner() call runs, as the engine itself reports it
        (OpenVINO: the compiled model's INFERENCE_PRECISION_HINT, bf16 by default on a CPU with
        AVX512_BF16 or AMX), in math()'s form; None when math(precision) says it all. The worker
        sends it back and the table shows it in place of math(precision)."""
        return getattr(self, "_ran_math", None)

    def prepare(self, work: str, model_dir: str) -> None:
        """Convert / export / quantize the saved transformers model in `model_dir` for `work`
        ("gpt2" | "bert"), once: keep the result under `model_dir` and return at once when it is
        there. Runs in a worker process; raise Skip(reason) when the engine cannot take the model."""

    def runner(self, work: str, precision: str, model_dir: str, ids, threads: int) -> tuple[Callable[[], Any], int]:
        """A zero-argument callable running one call of the workload on token ids `ids` (a LongTensor:
        (1, prompt) for "gpt2", which decodes workloads.GPT2_NEW tokens greedily; (batch, seq) for
        "bert", one forward) with `threads` threads, and the units one call makes (new tokens, or 1).
        Runs in the worker process, which times it; raise Skip(reason) where it cannot run."""
        raise NotImplementedError
