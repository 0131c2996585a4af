"""Every (case, provider) of fastlm.bench's in-process suites as a pytest-benchmark test. A provider that cannot
run here (no CUDA, torch.compile off on CPU, ...) is skipped with its reason."""

import pytest
import torch
from conftest import DEVICE, DTYPE

from fastlm.bench.result import Skip
from fastlm.bench.runner import build_cases

SUITE = "all"
CASES = build_cases(DEVICE, DTYPE, SUITE, None)
PARAMS = [(c, p) for c in CASES for p in c.providers]


@pytest.mark.parametrize("case,provider", PARAMS, ids=[f"{c.name}[{c.label}]-{p}" for c, p in PARAMS])
def test_bench(benchmark, case, provider):
    try:
        fn = case.providers[provider]()
    except Skip as e:
        pytest.skip(str(e))
    benchmark.group = f"{case.name} {case.label}"
    benchmark.extra_info.update(unit=case.unit, flops=case.flops, bytes=case.bytes, tokens=case.tokens)

    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up: JIT compiles and autotuning stay out of the numbers
    rounds = 20 if DEVICE == "cuda" else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
