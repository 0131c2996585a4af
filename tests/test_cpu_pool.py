"""The work-sharing pool of the CPU decode kernels (csrc/cpu_pool.h): its size follows
torch.set_num_threads (on the calling thread and on a thread the caller starts) and OMP_NUM_THREADS,
work shared with helpers gives the bits one thread gives, and two callers at once are both right.
Its behaviour under contention (bounded spin, sleep, back-off) is measured by bench/contention.py."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from fastlm import _ext
from fastlm.linear import PackedLinear

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stats():
    threads, helper_chunks, started, shared, stalls, backoff = torch.ops.fastlm.cpu_pool_stats()
    return dict(threads=threads, helper_chunks=helper_chunks, started=started, shared=shared, stalls=stalls,
                backoff=backoff)


@pytest.fixture(scope="module")
def big():
    """A 1024 -> 4099 fp32 projection (16 MB of panels: many chunks) and 3 input rows."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(1024, 4099)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4099, 1024, generator=g))
        lin.bias.copy_(torch.randn(4099, generator=g))
    return PackedLinear.from_linear(lin), torch.randn(3, 1024, generator=g), lin


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_size_follows_torch_set_num_threads(big, threads):
    packed, x, lin = big
    torch.set_num_threads(1)
    s0 = stats()
    with torch.inference_mode():
        one = packed(x)
    s1 = stats()
    assert s1["threads"] == 1 and s1["shared"] == s0["shared"] and s1["backoff"] == s0["backoff"]  # caller alone
    torch.set_num_threads(2)
    with torch.inference_mode():
        two = packed(x)
    s2 = stats()
    assert s2["threads"] == 2
    assert s2["shared"] + s2["backoff"] > s1["shared"] + s1["backoff"]  # shared (or backed off under load)
    assert s2["started"] >= 1
    assert torch.equal(one, two)  # chunks of output channels: the same bits on any number of threads
    torch.testing.assert_close(one, torch.nn.functional.linear(x.double(), lin.weight.double(),
                                                               lin.bias.double()).float(), rtol=1e-4, atol=1e-3)


def test_size_follows_torch_threads_on_another_thread(big, threads):
    """A server's worker thread: torch.set_num_threads on the main thread holds there too."""
    packed, x, _ = big
    torch.set_num_threads(1)
    seen = []

    def work():
        with torch.inference_mode():
            packed(x)
        seen.append(stats()["threads"])

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [1]


def test_size_follows_omp_num_threads():
    code = ("import torch, fastlm\nfrom fastlm.linear import PackedLinear\n"
            "p = PackedLinear.from_linear(torch.nn.Linear(512, 2048))\n"
            "with torch.inference_mode(): p(torch.randn(2, 512))\n"
            "print(torch.ops.fastlm.cpu_pool_stats()[0])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_two_callers_at_once_are_both_right(big, threads):
    """A second thread calling while a job is in flight runs its chunks itself; both results exact."""
    packed, x, _ = big
    torch.set_num_threads(2)
    with torch.inference_mode():
        want = packed(x)
    bad = []

    def loop(seed):
        xi = x * (1 + seed)
        with torch.inference_mode():
            ref = packed(xi)
            for _ in range(20):
                if not torch.equal(packed(xi), ref):
                    bad.append(seed)

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad
    with torch.inference_mode():
        assert torch.equal(packed(x), want)
