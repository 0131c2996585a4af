"""fastlm itself in the peers suite: fastlm.from_pretrained on the saved model, fp32, int8
(quantize="int8" for GPT-2 decode, "int8_dynamic" for the BERT forward) and bf16
(dtype=torch.bfloat16: bf16 weights and KV cache, fp32 accumulation; docs/design.md)."""

from __future__ import annotations

import inspect
import os

from fastlm.bench.peers.base import TORCH_AVX2, Engine
from fastlm.bench.peers.workloads import GPT2_NEW, GPT2_PROMPT
from fastlm.bench.result import Skip


class FastLM(Engine):
    name = "fastlm"
    title = "fastlm"
    optional = False
    batch_decode = True
    precisions = ("fp32", "int8", "bf16")

    def isa_cap(self, isa):
        return {"env": dict(TORCH_AVX2), "forced": "yes", "note": " ".join(f"{k}={v}" for k, v in TORCH_AVX2.items())}

    def version(self) -> str | None:
        import fastlm

        return fastlm.__version__

    def math(self, precision: str) -> str:
        if precision == "int8":
            return "int8 (GPT-2 int8, BERT int8_dynamic)"
        return "bf16 (fp32 accumulation)" if precision == "bf16" else precision

    def runner(self, work, precision, model_dir, ids, threads):
        import torch

        import fastlm

        kw = {}
        if precision == "int8":
            if "quantize" not in inspect.signature(fastlm.from_pretrained).parameters:
                raise Skip("fastlm.from_pretrained has no quantize= yet (issue 10 item 2)")
            kw["quantize"] = "int8" if work.startswith("gpt2") else "int8_dynamic"
        try:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            m = fastlm.from_pretrained(model_dir, dtype=dtype, device="cpu", **kw)
        except (ValueError, NotImplementedError) as e:
            raise Skip(f"fastlm quantize={kw.get('quantize')}: {e}") from None
        if os.environ.get("FASTLM_CPU_ISA") and hasattr(torch.ops.fastlm, "cpu_isa"):
            # a capped run (fastlm bench --isa): the row says which kernels fastlm._C really ran
            self._ran_math = f"{self.math(precision)}, {torch.ops.fastlm.cpu_isa()} kernels"
        if work.startswith("gpt2"):  # gpt2 (B = 1) and the batched gpt2_bB: ids (B, prompt)
            def run():
                out = m.generate(ids, max_new_tokens=GPT2_NEW)
                assert out.shape == (ids.shape[0], GPT2_PROMPT + GPT2_NEW), out.shape
            return run, ids.shape[0] * GPT2_NEW
        return lambda: m(ids), 1


ENGINE = FastLM()
