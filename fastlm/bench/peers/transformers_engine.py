"""transformers (sdpa) in the peers suite: fp32, and int8 through torch.ao's dynamic quantization
(int8 nn.Linear weights, per-token int8 activations; BERT only: GPT-2's projections are Conv1D)."""

from __future__ import annotations

from fastlm.bench.peers.base import TORCH_AVX2, Engine
from fastlm.bench.peers.workloads import GPT2_NEW, GPT2_PROMPT
from fastlm.bench.result import Skip


class Transformers(Engine):
    name = "transformers"
    title = "transformers (sdpa)"
    module = "transformers"
    optional = False
    batch_decode = True

    def isa_cap(self, isa):
        return {"env": dict(TORCH_AVX2), "forced": "yes",
                "note": "torch: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"}

    def label(self, precision: str) -> str:
        return f"{self.title} + torch dynamic" if precision == "int8" else self.title

    def math(self, precision: str) -> str:
        return "int8 (torch.ao quantize_dynamic)" if precision == "int8" else precision

    def runner(self, work, precision, model_dir, ids, threads):
        import torch
        import transformers as tf

        gpt2 = work.startswith("gpt2")  # gpt2 (B = 1) and the batched gpt2_bB: ids (B, prompt), no padding
        if precision != "fp32" and gpt2:
            raise Skip("torch's dynamic int8 quantization covers nn.Linear; GPT-2's Conv1D projections stay fp32")
        cls = tf.GPT2LMHeadModel if gpt2 else tf.BertModel
        m = cls.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        if precision == "int8":  # torch.ao dynamic quantization: int8 weights, per-token int8 activations
            m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
        if gpt2:
            def run():
                with torch.inference_mode():
                    out = m.generate(ids, max_new_tokens=GPT2_NEW, min_new_tokens=GPT2_NEW, do_sample=False,
                                     pad_token_id=0)
                assert out.shape == (ids.shape[0], GPT2_PROMPT + GPT2_NEW), out.shape
            return run, ids.shape[0] * GPT2_NEW

        def fwd():
            with torch.inference_mode():
                return m(input_ids=ids)
        return fwd, 1


ENGINE = Transformers()
