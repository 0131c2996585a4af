"""A short soak of `fastlm serve` (the CI version of fastlm/bench/serve_soak.py): a few hundred mixed
completions (greedy and seeded sampling, streamed and not, n = 2, logprobs, a tenth abandoned by their
client mid-stream or by a client timeout) against a random GPT-2, with the server's RSS read after a
warm-up and at the end. The growth must stay under GROWTH_MIB; the same soak against a server patched
to keep one cache row and the request object per finished request (a leak, LEAK_KIB a request) must
break that bound, which shows the bound can catch such a leak."""

import sys
import textwrap

import pytest

pytest.importorskip("fastapi", reason="pip install 'fastlm[serve]'")
pytest.importorskip("httpx")
pytest.importorskip("psutil")

from serve_util import Server, gpt2_checkpoint, running  # noqa: E402

from fastlm.bench.serve_soak import soak  # noqa: E402

REQUESTS, WARMUP = 200, 60
N_LAYER, N_EMBD, N_POS = 2, 64, 96
LEAK_KIB = 2 * N_LAYER * N_POS * N_EMBD * 4 / 1024  # K and V rows of one slot, float32: 96 KiB
GROWTH_MIB = REQUESTS * LEAK_KIB / 1024 / 3  # a third of what the leak adds (6.25 MiB)

LEAKY = textwrap.dedent("""
    import sys
    from fastlm.serve import engine
    KEPT = []
    _remove = engine.GenerationEngine._remove
    def leaky_remove(self, idx):
        for i in idx:  # the bug this models: a finished request and a copy of its cache rows kept forever
            KEPT.append((self.active[i], self.cache.k[:, i].clone(), self.cache.v[:, i].clone()))
        _remove(self, idx)
    engine.GenerationEngine._remove = leaky_remove
    from fastlm.cli import main
    sys.exit(main())
""")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = gpt2_checkpoint(tmp_path_factory.mktemp("gpt2soak"), n_layer=N_LAYER, n_embd=N_EMBD, n_head=4,
                        n_positions=N_POS)
    script = tmp_path_factory.mktemp("leaky") / "leaky_serve.py"
    script.write_text(LEAKY)
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # set: fastlm serve does not re-execute itself (and drop the patch)
    s = {"plain": Server(d, "--max-num-seqs", "8", env=env),
         "leaky": Server(d, "--max-num-seqs", "8", env=env, launcher=[sys.executable, str(script)])}
    with running(s):
        yield s


@pytest.mark.parametrize("which", ["plain", "leaky"])
def test_soak_rss_flat_and_a_leak_breaks_the_bound(servers, which, record_property):
    srv = servers[which]
    r = soak(srv.url, srv.proc.pid, "generate", REQUESTS, warmup=WARMUP, vocab=18, seed=3)
    record_property(f"serve_soak_{which}_growth_mib", r["growth_mib"])
    print(f"soak {which}: {r['counts']}, RSS start {r['rss_start_mib']} warm {r['rss_warm_mib']} end "
          f"{r['rss_end_mib']} MiB (growth {r['growth_mib']} MiB, bound {GROWTH_MIB:.1f})")
    assert set(r["counts"]) <= {"ok", "disconnected"}, r["counts"]  # nothing failed
    assert r["counts"]["ok"] >= REQUESTS * 0.8 and r["counts"].get("disconnected", 0) > 0, r["counts"]
    if which == "plain":
        assert r["growth_mib"] < GROWTH_MIB, r
    else:
        assert r["growth_mib"] > GROWTH_MIB, r
