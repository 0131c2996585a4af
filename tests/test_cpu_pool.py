"""The work-sharing pool of the CPU decode kernels (csrc/cpu_pool.h): its size follows
torch.set_num_threads (on the calling thread and on a thread the caller starts) and OMP_NUM_THREADS,
work shared with helpers gives the bits one thread gives, two callers at once are both right, and a
helper that starts late (or stops while it holds a chunk: torch.ops.fastlm.cpu_pool_debug delays
it) costs neither the result nor the pool. Its speed under contention (bounded spin, sleep, back-off)
is measured by bench/contention.py and bench/contention_ab.py."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from fastlm import _ext
from fastlm.linear import PackedLinear

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stats():
    names = ["threads", "helper_chunks", "started", "shared", "stalls", "backoff", "wait_us", "busy", "delay_permille"]
    v = torch.ops.fastlm.cpu_pool_stats()
    assert len(v) == len(names)
    return dict(zip(names, v, strict=True))


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


# Run in a child with the stall and busy back-offs off (FASTLM_POOL_STALL_US=0, FASTLM_POOL_BUSY_PCT=0), so
# that every job is shared whatever else runs on the machine and the delays are deterministic.
LATE_HELPER = r"""
import sys, time, torch
from fastlm.linear import PackedLinear
ops = torch.ops.fastlm
M, N, K = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(M * N + K)
lin = torch.nn.Linear(K, N)
with torch.no_grad():
    lin.weight.copy_(torch.randn(N, K, generator=g))
    lin.bias.copy_(torch.randn(N, generator=g))
p = PackedLinear.from_linear(lin)
x = torch.randn(M, K, generator=g)
def st():
    return dict(zip(["threads", "helper_chunks", "started", "shared", "stalls", "backoff", "wait_us", "busy",
                     "delay_permille"], ops.cpu_pool_stats()))
def call():
    torch.full((M * N + 64,), float("nan")).sum()  # NaN-filled memory for the output to land on
    s0 = st()
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = p(x)
    return y, time.perf_counter() - t0, s0, st()
torch.set_num_threads(1)
ref, _, _, _ = call()
want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
torch.testing.assert_close(ref.double(), want, rtol=1e-4, atol=1e-3)
torch.set_num_threads(2)
for _ in range(3):
    call()  # helpers started and warm
assert st()["started"] >= 1
# 1: every helper sleeps 0.5 s before it claims anything of a job: the caller runs the jobs alone
# and does not wait for it, also for the next job while the helper still sleeps
assert list(ops.cpu_pool_debug(1, 500000)) == [0, 0]
time.sleep(0.01)
for i in range(2):
    y, dt, s0, s1 = call()
    assert torch.equal(y, ref), i
    assert s1["shared"] == s0["shared"] + 1 and s1["helper_chunks"] == 0, (s0, s1)
    assert s1["wait_us"] == s0["wait_us"] and dt < 0.25, (dt, s0, s1)
ops.cpu_pool_debug(0, 0)
time.sleep(0.6)  # the late helper wakes, finds those jobs over and touches nothing
helped = 0
for i in range(200):
    y, _, s0, s1 = call()
    assert torch.equal(y, ref), i
    helped += s1["helper_chunks"] > 0
    if helped >= 3:
        break
assert helped >= 3, helped  # the pool is shared again
# 2: a helper stops for 0.1 s holding the first chunk it claims: the caller runs every other chunk
# and waits for that one only
ops.cpu_pool_debug(2, 100000)
time.sleep(0.01)
y, dt, s0, s1 = call()
assert torch.equal(y, ref)
if s1["helper_chunks"] > 0:  # the helper woke in time to claim one
    assert s1["helper_chunks"] == 1 and dt >= 0.09 and s1["wait_us"] - s0["wait_us"] >= 50000, (dt, s0, s1)
ops.cpu_pool_debug(0, 0)
for i in range(20):
    y, _, _, _ = call()
    assert torch.equal(y, ref), i
torch.set_num_threads(1)
y, _, _, _ = call()
assert torch.equal(y, ref)
print("ok")
"""


@pytest.mark.parametrize("M,N,K", [(1, 4099, 1024), (3, 2053, 129), (17, 1025, 97)])
def test_late_or_stopped_helper(M, N, K):
    env = dict(os.environ, PYTHONPATH=ROOT, FASTLM_POOL_STALL_US="0", FASTLM_POOL_BUSY_PCT="0")
    out = subprocess.run([sys.executable, "-c", LATE_HELPER, str(M), str(N), str(K)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_stopped_helper_starts_a_back_off(big, threads):
    """Default triggers: a helper that holds a chunk for 50 ms is a stall (the pool then runs the next
    jobs on the caller alone for a back-off window); the bits stay those of one thread throughout."""
    packed, x, _ = big
    torch.set_num_threads(1)
    with torch.inference_mode():
        ref = packed(x)
    torch.set_num_threads(2)
    with torch.inference_mode():
        for _ in range(3):
            packed(x)
    prev = torch.ops.fastlm.cpu_pool_debug(2, 50000)
    try:
        s0 = stats()
        with torch.inference_mode():
            y = packed(x)
            y2 = packed(x)
        s1 = stats()
    finally:
        torch.ops.fastlm.cpu_pool_debug(*prev)
    assert torch.equal(y, ref) and torch.equal(y2, ref)
    if s1["wait_us"] - s0["wait_us"] >= 30000:  # the first job was shared and a helper held a chunk
        assert s1["stalls"] == s0["stalls"] + 1, (s0, s1)
    time.sleep(0.4)  # past the longest window
    with torch.inference_mode():
        for _ in range(5):
            assert torch.equal(packed(x), ref)


def test_debug_hook_refuses_bad_values():
    with pytest.raises(ValueError, match="cpu_pool_debug: mode must be"):
        torch.ops.fastlm.cpu_pool_debug(3, 0)
    with pytest.raises(ValueError, match="cpu_pool_debug: us must be"):
        torch.ops.fastlm.cpu_pool_debug(1, -1)


ONE_CORE = r"""
import os, torch
from fastlm.linear import PackedLinear
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # helpers started later inherit it
ops = torch.ops.fastlm
g = torch.Generator().manual_seed(1)
lin = torch.nn.Linear(512, 1031)
p = PackedLinear.from_linear(lin)
x = torch.randn(1, 512, generator=g)
torch.set_num_threads(1)
with torch.inference_mode():
    ref = p(x)
torch.set_num_threads(2)  # two threads on one core: the caller is preempted by its own helper
names = ["threads", "helper_chunks", "started", "shared", "stalls", "backoff", "wait_us", "busy", "delay_permille"]
st = lambda: dict(zip(names, ops.cpu_pool_stats()))
s0 = st()
with torch.inference_mode():
    for i in range(3000):
        assert torch.equal(p(x), ref), i
s1 = st()
assert s1["shared"] + s1["backoff"] > s0["shared"] + s0["backoff"], (s0, s1)
print("ok", s1["shared"] - s0["shared"], s1["stalls"] - s0["stalls"])
"""


def test_two_threads_on_one_core():
    """Two threads on one core: the caller is preempted by its own helper while sharing (stalls, back-off
    windows); every result keeps the bits of one thread and no call hangs."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", ONE_CORE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ok")


BUSY = r"""
import os, sys, time, torch
from fastlm.linear import PackedLinear
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # the helper started later inherits it
ops = torch.ops.fastlm
names = ["threads", "helper_chunks", "started", "shared", "stalls", "backoff", "wait_us", "busy", "delay_permille"]
st = lambda: dict(zip(names, ops.cpu_pool_stats(), strict=True))
g = torch.Generator().manual_seed(2)
lin = torch.nn.Linear(768, 2053)
with torch.no_grad():
    lin.weight.copy_(torch.randn(2053, 768, generator=g))
p = PackedLinear.from_linear(lin)
x = torch.randn(1, 768, generator=g)
torch.set_num_threads(1)
with torch.inference_mode():
    ref = p(x)
torch.testing.assert_close(ref.double(), torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()),
                           rtol=1e-4, atol=1e-3)
torch.set_num_threads(2)  # caller and helper on one core: each waits for the CPU about half the time
s0 = st()
t_end = time.perf_counter() + 1.5
with torch.inference_mode():
    while time.perf_counter() < t_end:
        torch.full((2053 + 64,), float("nan")).sum()  # NaN-filled memory for the output to land on
        assert torch.equal(p(x), ref)
s1 = st()
print("ok", s1["busy"] - s0["busy"], s1["delay_permille"], s1["shared"] - s0["shared"], s1["backoff"] - s0["backoff"])
"""


@pytest.mark.parametrize("busy_pct", [None, "0"])
def test_busy_cpus_start_a_back_off(busy_pct):
    """Caller and helper pinned to one core wait for it about half the time (run_delay in
    /proc/self/task/<tid>/schedstat): the busy check starts back-off windows (FASTLM_POOL_BUSY_PCT=0
    turns it off), with the stall back-off off so the busy check alone decides; the bits stay those of
    one thread."""
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/schedstat"):
        pytest.skip("this kernel has no schedstat (CONFIG_SCHED_INFO): the busy check is off here")
    env = dict(os.environ, PYTHONPATH=ROOT, FASTLM_POOL_STALL_US="0")
    env.pop("FASTLM_POOL_BUSY_PCT", None)
    if busy_pct is not None:
        env["FASTLM_POOL_BUSY_PCT"] = busy_pct
    out = subprocess.run([sys.executable, "-c", BUSY], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    word, busy, permille, shared, alone = out.stdout.strip().splitlines()[-1].split()
    assert word == "ok"
    busy, permille, shared, alone = int(busy), int(permille), int(shared), int(alone)
    if busy_pct == "0":
        assert busy == 0 and permille == -1 and alone == 0 and shared > 0, (busy, permille, shared, alone)
    else:
        assert busy >= 1 and permille >= 200 and alone > 0, (busy, permille, shared, alone)
