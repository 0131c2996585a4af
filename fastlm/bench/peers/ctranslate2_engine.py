"""CTranslate2 in the peers suite (`pip install 'fastlm[peers]'`): the saved model converted
offline once, in fp32, into <model_dir>/ct2-<version>; its int8 rows quantize at load
(compute_type="int8"), as CTranslate2 does. GPT-2 decodes through ctranslate2.Generator (greedy,
token strings in), BERT runs ctranslate2.Encoder.forward_batch."""

from __future__ import annotations

import json
import os

from fastlm.bench.peers.base import Engine
from fastlm.bench.peers.workloads import GPT2_NEW


def converted_dir(model_dir: str) -> str:
    """Where prepare() leaves the converted model."""
    import ctranslate2

    return os.path.join(model_dir, f"ct2-{ctranslate2.__version__}")


def gen_tokens(d: str, ids: list[int]) -> list[str]:
    """Token ids -> the converted model's token strings (CTranslate2's Generator takes strings)."""
    with open(os.path.join(d, "tokenizer.json")) as f:
        vocab = json.load(f)["model"]["vocab"]
    inv = {i: s for s, i in vocab.items()}
    return [inv[i] for i in ids]


class CTranslate2(Engine):
    name = "ctranslate2"
    title = "CTranslate2"
    module = "ctranslate2"
    install = "pip install 'fastlm[peers]'"
    prepares = True
    batch_decode = True

    def isa_cap(self, isa):
        return {"env": {"CT2_FORCE_CPU_ISA": "AVX2"}, "forced": "yes", "note": "CT2_FORCE_CPU_ISA=AVX2"}

    def prepare(self, work, model_dir):
        import ctranslate2

        out = converted_dir(model_dir)
        if not os.path.exists(os.path.join(out, "model.bin")):
            ctranslate2.converters.TransformersConverter(model_dir).convert(out + ".partial", force=True)
            os.replace(out + ".partial", out)

    def runner(self, work, precision, model_dir, ids, threads):
        import ctranslate2

        path = converted_dir(model_dir)
        compute = {"fp32": "float32", "int8": "int8"}[precision]
        if work.startswith("gpt2"):  # gpt2 (B = 1) and the batched gpt2_bB: one generate_batch of B prompts
            gen = ctranslate2.Generator(path, device="cpu", compute_type=compute, intra_threads=threads,
                                        inter_threads=1)
            prompt = [gen_tokens(model_dir, row.tolist()) for row in ids]

            def run():
                r = gen.generate_batch(prompt, max_length=GPT2_NEW, min_length=GPT2_NEW, sampling_topk=1,
                                       include_prompt_in_result=False)
                assert all(len(x.sequences_ids[0]) == GPT2_NEW for x in r), [len(x.sequences_ids[0]) for x in r]
            return run, len(prompt) * GPT2_NEW
        enc = ctranslate2.Encoder(path, device="cpu", compute_type=compute, intra_threads=threads, inter_threads=1)
        batch = ids.tolist()
        return lambda: enc.forward_batch(batch), 1


ENGINE = CTranslate2()
