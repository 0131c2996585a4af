"""The FFN and linear cases of the ops suite (fastlm.bench.ops runs them): GPT-2 small's /
BERT-base's MLP (d_model 768, d_ff 3072) in prefill and decode, with int8 weights, and the CPU
prefill linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.bench.result import Case, Skip


def _ffn_inputs(M: int, d: int, d_ff: int, device: str, dtype: torch.dtype):
    """Random x (M, d), w1 (d_ff, d), b1 (d_ff,), w2 (d, d_ff), b2 (d,): an MLP in nn.Linear layout."""
    x = torch.randn(M, d, device=device, dtype=dtype)
    w1 = torch.randn(d_ff, d, device=device, dtype=dtype) * d**-0.5
    w2 = torch.randn(d, d_ff, device=device, dtype=dtype) * d_ff**-0.5
    return x, w1, torch.randn(d_ff, device=device, dtype=dtype), w2, torch.randn(d, device=device, dtype=dtype)


def _torch_ffn(mk):
    """The torch baseline of an FFN: linear + gelu (tanh) + linear + residual add."""
    x, w1, b1, w2, b2 = mk()
    return lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) + x


def ffn_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """FFN d_model 768 / d_ff 3072 (GPT-2 small, BERT-base). Prefill (many rows) in TFLOP/s against
    torch (linear + gelu + linear + add) and the two GEMMs alone; decode (<= 16 rows) in GB/s of
    weight bytes."""
    d, d_ff = (768, 3072)
    rows = [1, 4, 16, 512, 2048, 8192, 16384] if device == "cuda" else [1, 16, 256]
    eb = torch.finfo(dtype).bits // 8
    cases = []
    for M in rows:
        def mk(M=M):
            return _ffn_inputs(M, d, d_ff, device, dtype)

        def fastlm_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            return lambda: ops.ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=x)

        def gemms(mk=mk):
            x, w1, b1, w2, b2 = mk()
            h = torch.empty(x.shape[0], d_ff, device=device, dtype=dtype)
            return lambda: (torch.mm(x, w1.t(), out=h), torch.mm(h, w2.t()))

        decode = M <= 16
        wbytes = 2 * d * d_ff * eb
        cases.append(Case("ffn_decode" if decode else "ffn_prefill", "ops", f"M{M} d{d} d_ff{d_ff}", M,
                          {"fastlm": fastlm_p, "torch": lambda mk=mk: _torch_ffn(mk), "gemms_only": gemms},
                          flops=0.0 if decode else 4.0 * M * d * d_ff, bytes=wbytes if decode else 0.0,
                          unit="GB/s" if decode else "TFLOP/s", x_name="rows (M)"))
    return cases


def ffn_int8_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """Decode FFN (d 768 / d_ff 3072, GPT-2 small's MLP) with int8 weight-only linears
    (fastlm.linear.Int8Linear: CPU AVX2 GEMV / CUDA int8 GEMV) against the same FFN on the model
    dtype's GEMV (fastlm.ops.ffn; on CPU the packed fp32 linears) and torch. GB/s of each provider's
    own weight bytes: int8 for fastlm_int8, the model dtype's (2-4x more) for the others."""
    from fastlm.linear import Int8Linear, PackedLinear

    d, d_ff = (768, 3072)
    dt, dense_bytes = str(dtype).replace("torch.", ""), 2.0 * d * d_ff * torch.finfo(dtype).bits // 8
    cases = []
    for M in [1, 4, 16]:
        def mk(M=M):
            return _ffn_inputs(M, d, d_ff, device, dtype)

        def int8_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            if device == "cpu" and dtype != torch.float32:
                raise Skip("the CPU int8 kernel takes float32 activations")
            fc, proj = Int8Linear(w1, b1).to(device), Int8Linear(w2, b2).to(device)
            return lambda: proj(fc(x, activation="gelu_tanh"), residual=x)

        def dense_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            if device == "cpu" and dtype == torch.float32:
                fc, proj = PackedLinear(w1, b1), PackedLinear(w2, b2)
                return lambda: proj(fc(x, activation="gelu_tanh"), residual=x)
            return lambda: ops.ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=x)

        cases.append(Case("ffn_decode_int8", "ops", f"M{M} d{d} d_ff{d_ff} int8", M,
                          {"fastlm_int8": int8_p, "fastlm": dense_p, "torch": lambda mk=mk: _torch_ffn(mk)},
                          bytes=2.0 * d * d_ff, bytes_by={"fastlm": dense_bytes, "torch": dense_bytes}, unit="GB/s",
                          x_name="rows (M)", dtype=f"fastlm_int8: int8 weights, {dt} activations; the others {dt}"))
    return cases


def linear_prefill_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """CPU fp32 prefill linears (GPT-2 small's c_fc, 768 -> 3072, with bias) at 32 and 512 rows:
    the packed-panel GEMM every decode projection also uses for its prompt (fastlm.linear.PackedLinear,
    csrc/gemv.cpp) against oneDNN on a weight prepacked once (fastlm.linear_cpu.CPULinear,
    torch's mkldnn linear) and torch's F.linear. CPU float32 only (elsewhere the model's GPU
    GEMMs run)."""
    from fastlm.linear import PackedLinear
    from fastlm.linear_cpu import CPULinear

    d, d_ff = 768, 3072
    cases = []
    for M in [32, 512]:
        def mk(M=M):
            if device != "cpu" or dtype != torch.float32:
                raise Skip("CPU float32 only")
            lin = torch.nn.Linear(d, d_ff)
            return torch.randn(M, d), lin

        def packed_p(mk=mk):
            x, lin = mk()
            p = PackedLinear.from_linear(lin)
            return lambda: p(x)

        def onednn_p(mk=mk):
            x, lin = mk()
            c = CPULinear(d, d_ff)
            c.load_state_dict(lin.state_dict())

            def run():
                with torch.no_grad():  # CPULinear runs oneDNN with autograd off (inference)
                    return c(x)
            return run

        def torch_p(mk=mk):
            x, lin = mk()
            return lambda: F.linear(x, lin.weight, lin.bias)

        cases.append(Case("linear_prefill", "ops", f"M{M} {d}->{d_ff}", M,
                          {"fastlm": packed_p, "onednn_prepacked": onednn_p, "torch": torch_p},
                          flops=2.0 * M * d * d_ff, unit="TFLOP/s", x_name="rows (M)"))
    return cases
