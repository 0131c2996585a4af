"""A model that transformers runs, fastlm runs: where a kernel does not cover the inputs (a head
dim over 128, an arch below sm_80) or fails to compile / launch on the GPU, the op runs the
reference with one log line; FASTLM_STRICT=1 makes that an error; raw fastlm.ops calls refuse
uncovered inputs with ValueError. Also the launch rules every kernel follows (grid axes, the
device guard) and the refusal of triton < 3.8 with numpy >= 2.4 under the interpreter.

On CPU the Triton path is the interpreter (conftest sets TRITON_INTERPRET=1), so "triton"
below runs the real launchers there and on a GPU alike."""

import logging

import pytest
import torch
import transformers as tf
from conftest import randomize_

import fastlm
from fastlm import backend, ops, reference
from fastlm.testing import max_err

ATOL32 = 1e-4


@pytest.fixture
def lenient(monkeypatch):
    """Fallback allowed (FASTLM_STRICT off) with fresh once-only bookkeeping."""
    monkeypatch.setenv("FASTLM_STRICT", "0")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_broken", set())


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv("FASTLM_STRICT", "1")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_broken", set())


def fallback_lines(caplog):
    return [r.getMessage() for r in caplog.records if "falls back to the reference" in r.getMessage()]


def qkv(B=2, H=2, S=5, D=160, dtype=torch.float32, device="cpu"):
    return [torch.randn(B, H, S, D, dtype=dtype, device=device) for _ in range(3)]


# -- coverage: head dim > 128 ------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["auto", "torch", "triton"])
def test_raw_ops_refuse_uncovered_head_dim(device, backend_name):
    q, k, v = qkv(device=device)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=device)
    with fastlm.use_backend(backend_name):
        with pytest.raises(ValueError, match="head dim 160"):
            ops.attention(q, k, v)
        with pytest.raises(ValueError, match="head dim 160"):
            ops.decode_attention(q[:, :, :1], k, v, lens)
        t = torch.randn(7, 2, 160, device=device)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
        with pytest.raises(ValueError, match="head dim 160"):
            ops.attention_varlen(t, t, t, cu, 4)


def test_inside_a_model_uncovered_head_dim_falls_back_once(device, lenient, caplog):
    q, k, v = qkv(device=device)
    kpm = torch.tensor([[True] * 5, [True, True, False, False, False]], device=device)
    caplog.set_level(logging.WARNING, logger="fastlm")
    with fastlm.use_backend("triton"), backend.model_scope():
        for _ in range(3):
            out = ops.attention(q, k, v, causal=True, key_padding_mask=kpm)
    ref = reference.attention(q, k, v, True, kpm, 160**-0.5)
    assert max_err(out, ref) == 0  # it is the reference
    lines = fallback_lines(caplog)
    assert len(lines) == 1, lines
    assert "attention" in lines[0] and "head dim 160" in lines[0]


def test_inside_a_model_strict_mode_raises(device, strict):
    q, k, v = qkv(device=device)
    with fastlm.use_backend("triton"), backend.model_scope(), \
            pytest.raises(backend.StrictModeError, match="head dim 160.*FASTLM_STRICT=1"):
        ops.attention(q, k, v)


def test_no_fallback_message_when_the_reference_runs_anyway(lenient, caplog):
    """On the CPU path the reference is what runs: nothing falls back, strict mode has no say."""
    q, k, v = qkv()
    caplog.set_level(logging.WARNING, logger="fastlm")
    with fastlm.use_backend("torch"), backend.model_scope():
        ops.attention(q, k, v)
    assert not fallback_lines(caplog)


HD160_GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 320, "vocab_size": 97, "n_positions": 32}
HD160_BERT = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 320, "intermediate_size": 200,
              "vocab_size": 97, "max_position_embeddings": 32}


def gpt2_hd160():
    return randomize_(tf.GPT2LMHeadModel(tf.GPT2Config(**HD160_GPT2, bos_token_id=0, eos_token_id=0)).eval())


def bert_hd160():
    return randomize_(tf.BertModel(tf.BertConfig(**HD160_BERT)).eval())


def padded(B, S, vocab, lengths):
    ids = torch.randint(0, vocab, (B, S))
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids, mask


def test_head_dim_160_models_match_transformers_on_the_cpu_path():
    """Strict mode is on (conftest): the CPU path runs without any fallback."""
    hf = gpt2_hd160()
    model = fastlm.from_pretrained(hf)
    ids, mask = padded(2, 11, 97, [11, 6])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    assert max_err(model(ids, mask).logits[m], ref[m]) <= ATOL32
    hb = bert_hd160()
    bert = fastlm.from_pretrained(hb)
    with torch.no_grad():
        ref = hb(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_err(bert(ids, mask).last_hidden_state[m], ref[m]) <= ATOL32


def test_head_dim_160_models_fall_back_on_the_triton_path(device, lenient, caplog):
    """GPT-2 (padded attention, then decode attention in generate) and BERT (unpadded varlen and
    padded-free paths) with head dim 160 on the Triton backend: the attention ops run the
    reference, everything else the kernels, and the outputs equal transformers' (fp32)."""
    caplog.set_level(logging.WARNING, logger="fastlm")
    hf = gpt2_hd160()
    model = fastlm.from_pretrained(hf, device=device)
    ids, mask = padded(2, 9, 97, [9, 5])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        prompts = ids[:, :5]  # two unpadded prompts: batched decode runs decode_attention (B == 1 runs attention)
        ref_gen = hf.generate(prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with fastlm.use_backend("triton"):
        got = model(ids.to(device), mask.to(device)).logits.cpu()
        gen = model.generate(prompts.to(device), max_new_tokens=4).cpu()
    m = mask.bool()
    assert max_err(got[m], ref[m]) <= ATOL32 * ref.abs().max().item()  # logits reach ~6 at this width
    assert len(set(ref_gen[0, -4:].tolist())) >= 2  # a diverse reference: a broken decode could not match it
    assert torch.equal(gen, ref_gen)

    hb = bert_hd160()
    bert = fastlm.from_pretrained(hb, device=device)
    with torch.no_grad():
        ref = hb(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_full = hb(input_ids=ids).last_hidden_state
    with fastlm.use_backend("triton"):
        got = bert(ids.to(device), mask.to(device)).last_hidden_state.cpu()
        full = bert(ids.to(device)).last_hidden_state.cpu()
    assert max_err(got[m], ref[m]) <= ATOL32 * ref.abs().max().item()
    assert max_err(full, ref_full) <= ATOL32 * ref_full.abs().max().item()

    lines = fallback_lines(caplog)
    ops_logged = sorted(line.removeprefix("fastlm: ").split(" on ")[0] for line in lines)
    assert ops_logged == ["attention", "attention_varlen", "decode_attention"], lines  # one line each


def test_head_dim_160_model_strict_mode_raises(device, strict):
    model = fastlm.from_pretrained(gpt2_hd160(), device=device)
    ids = torch.randint(0, 97, (1, 5), device=device)
    with fastlm.use_backend("triton"), pytest.raises(backend.StrictModeError, match="head dim 160"):
        model(ids)


# -- safety net: a kernel that fails to compile or launch --------------------------------------

class BrokenKernel:
    """Stands in for a @triton.jit kernel whose compile fails on this GPU: kernel[grid](...) raises."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            raise RuntimeError("PTX .version 9.9 does not support .target sm_999 (forced for the test)")

        return launch


def _case(name, device):
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    if name == "attention":
        q, k, v = r(2, 3, 7, 16), r(2, 3, 7, 16), r(2, 3, 7, 16)
        return "attention", "_attn_fwd", lambda: ops.attention(q, k, v, causal=True), \
            lambda: reference.attention(q, k, v, True, None, 0.25)
    if name == "attention_varlen":
        t = r(9, 2, 16)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
        return "attention", "_attn_fwd", lambda: ops.attention_varlen(t, t, t, cu, 5), \
            lambda: reference.attention_varlen(t, t, t, cu, 5, False, 0.25)
    if name == "decode_attention":
        q, kc = r(2, 2, 1, 16), r(2, 2, 8, 16)
        lens = torch.tensor([3, 8], dtype=torch.int32, device=device)
        return "decode_attention", "_decode_split", lambda: ops.decode_attention(q, kc, kc, lens), \
            lambda: reference.decode_attention(q, kc, kc, lens, 0.25)
    if name == "softmax":
        x = r(3, 5, 19)
        return "softmax", "_softmax_one_pass", lambda: ops.softmax(x, scale=0.5), \
            lambda: reference.softmax(x, -1, 0.5, None)
    if name == "layer_norm":
        x, res, w, b = r(4, 24), r(4, 24), r(24), r(24)
        return "layer_norm", "_add_layer_norm", lambda: ops.layer_norm(x, w, b, 1e-5, residual=res)[0], \
            lambda: reference.layer_norm(x, w, b, 1e-5, res)[0]
    if name == "ffn":
        x, w1, b1, w2, b2 = r(5, 16), r(32, 16), r(32), r(16, 32), r(16)
        return "ffn", "_linear_epilogue", lambda: ops.ffn(x, w1, b1, w2, b2), \
            lambda: reference.ffn(x, w1, b1, w2, b2, "gelu", None)
    raise AssertionError(name)


CASES = ["attention", "attention_varlen", "decode_attention", "softmax", "layer_norm", "ffn"]


@pytest.mark.parametrize("name", CASES)
def test_kernel_compile_failure_falls_back_with_one_warning(device, name, lenient, monkeypatch, caplog):
    module, attr, run, ref = _case(name, device)
    import importlib

    mod = importlib.import_module(f"fastlm.kernels.{module}")
    broken = BrokenKernel()
    monkeypatch.setattr(mod, attr, broken)
    caplog.set_level(logging.WARNING, logger="fastlm")
    with fastlm.use_backend("triton"):
        outs = [run() for _ in range(3)]
    for out in outs:
        assert max_err(out, ref()) <= 1e-6
    assert broken.calls == 1  # later calls go straight to the reference
    lines = fallback_lines(caplog)
    assert len(lines) == 1, lines
    op = "attention_varlen" if name == "attention_varlen" else name
    assert lines[0].startswith(f"fastlm: {op} on {backend.device_name(torch.device(device))}")
    assert "failed to compile or launch" in lines[0] and "sm_999" in lines[0]  # op, GPU and the error


@pytest.mark.parametrize("name", ["attention", "layer_norm"])
def test_kernel_compile_failure_strict_mode_raises(device, name, strict, monkeypatch):
    module, attr, run, _ = _case(name, device)
    import importlib

    monkeypatch.setattr(importlib.import_module(f"fastlm.kernels.{module}"), attr, BrokenKernel())
    with fastlm.use_backend("triton"), pytest.raises(backend.StrictModeError, match="sm_999") as err:
        run()
    assert isinstance(err.value.__cause__, RuntimeError)


def test_model_keeps_working_when_every_kernel_fails(device, lenient, monkeypatch):
    """Every Triton kernel broken at once: a GPT-2 forward still equals transformers'."""
    from fastlm.kernels import attention, decode_attention, ffn, layer_norm, softmax

    for mod, attr in ((attention, "_attn_fwd"), (decode_attention, "_decode_split"), (ffn, "_linear_epilogue"),
                      (layer_norm, "_add_layer_norm"), (softmax, "_softmax_one_pass")):
        monkeypatch.setattr(mod, attr, BrokenKernel())
    hf = randomize_(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50,
                                                     n_positions=16)).eval())
    model = fastlm.from_pretrained(hf, device=device)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    with fastlm.use_backend("triton"):
        got = model(ids.to(device)).logits.cpu()
    assert max_err(got, ref) <= ATOL32


def test_out_of_memory_is_not_a_kernel_fault(lenient, monkeypatch):
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        backend.run_kernel("attention", torch.device("cpu"), torch.float32, oom, lambda: 0)


# -- arch coverage ------------------------------------------------------------------------------

def test_arch_coverage(monkeypatch):
    cap = {"v": (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: cap["v"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    why = backend.arch_uncovered(torch.device("cuda", 0))
    assert why is not None and "sm_75" in why and "sm_80" in why
    for ok in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0)):
        cap["v"] = ok
        assert backend.arch_uncovered(torch.device("cuda", 1)) is None
    assert backend.arch_uncovered(torch.device("cpu")) is None


# -- triton < 3.8 with numpy >= 2.4 under the interpreter ----------------------------------------

@pytest.mark.parametrize("tv,nv,interpret,refused", [
    ("3.6.0", "2.4.6", "1", True),
    ("3.7.1", "2.4.0", "1", True),
    ("3.6.0", "2.3.5", "1", False),
    ("3.8.0", "2.4.6", "1", False),
    ("3.9.0", "2.5.0", "1", False),
    ("3.6.0", "2.4.6", "0", False),  # no interpreter: compiled kernels do not care
])
def test_interpreter_refuses_old_triton_with_new_numpy(monkeypatch, tv, nv, interpret, refused):
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", tv)
    monkeypatch.setattr(numpy, "__version__", nv)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    if refused:
        with pytest.raises(RuntimeError, match=r"numpy<2.4"):
            backend.check_interpreter()
        with pytest.raises(RuntimeError, match=r"triton 3\.\d\.\d and numpy 2\.\d"), fastlm.use_backend("triton"):
            ops.softmax(torch.randn(2, 3))
    else:
        backend.check_interpreter()


# -- launch rules: grid axes and the device guard -----------------------------------------------

def test_grid_helpers_keep_axes_1_and_2_within_cuda_limits():
    from fastlm.kernels.decode_attention import decode_grids, plan
    from fastlm.kernels.utils import GRID_AXIS12_MAX, attention_grid

    for bh, s, bm in ((5462 * 12, 128, 64), (10**6, 1, 32), (12, 2**20, 32), (2**31 - 1, 512, 128)):
        grid = attention_grid(bh, s, bm)
        assert grid[0] == bh and all(g <= GRID_AXIS12_MAX for g in grid[1:]), grid
    for bh, s_max in ((70_000, 1024), (12, 32768), (1, 2**20)):
        splits, _, _ = plan(s_max, bh, torch.device("cpu"))
        sg, cg = decode_grids(bh, splits)
        assert sg[0] == bh and cg == (bh,) and sg[1] <= 64


class GridRecorder:
    """Stands in for a @triton.jit kernel: records each launch's grid, runs nothing."""

    def __init__(self, log, guard_state):
        self.log, self.guard_state = log, guard_state

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((tuple(grid), self.guard_state["inside"]))

        return launch


@pytest.fixture
def recorded(monkeypatch):
    """Every launcher's kernels and device guard replaced by recorders (grid, inside the guard?)."""
    import contextlib

    from fastlm.kernels import attention, decode_attention, ffn, layer_norm, softmax

    log, state, guards = [], {"inside": False}, []

    @contextlib.contextmanager
    def guard(t):
        guards.append(t.device)
        state["inside"] = True
        try:
            yield
        finally:
            state["inside"] = False

    for mod, attrs in ((attention, ["_attn_fwd"]), (decode_attention, ["_decode_split", "_decode_combine"]),
                       (ffn, ["_linear_epilogue"]), (layer_norm, ["_add_layer_norm"]),
                       (softmax, ["_softmax_one_pass", "_softmax_online"])):
        monkeypatch.setattr(mod, "device_guard", guard)
        for a in attrs:
            monkeypatch.setattr(mod, a, GridRecorder(log, state))
    return log, guards


def test_wide_launches_put_batch_heads_on_axis_0(recorded):
    """B*H = 65,544 (a BERT batch of 5,462 x 12 heads): every attention launcher's grid has it on
    axis 0, and axes 1-2 stay within 65,535. (The interpreter does not enforce CUDA's limits, and
    a 65k-program interpreter run takes minutes here, so the launch grids are checked directly.)"""
    from fastlm.kernels import attention, decode_attention

    log, _ = recorded
    B, H, S, D = 5462, 12, 2, 16
    q = torch.empty(B, H, S, D)
    attention.attention(q, q, q, False, None, 0.25)
    t = torch.empty(B * S, H, D)
    cu = torch.arange(0, B * S + 1, S, dtype=torch.int32)
    attention.attention_varlen(t, t, t, cu, S, False, 0.25)
    decode_attention.decode_attention(q[:, :, :1], q, q, torch.full((B,), S, dtype=torch.int32), 0.25)
    assert len(log) == 4
    for grid, _ in log:
        assert grid[0] == B * H and all(g <= 65535 for g in grid[1:]), grid


def test_every_launcher_launches_inside_the_device_guard(recorded):
    """Triton launches on the current CUDA device: each launcher enters device_guard(its input)
    around the launch (so from_pretrained(..., device="cuda:1") works without set_device)."""
    from fastlm.kernels import attention, decode_attention, ffn, layer_norm, softmax

    log, guards = recorded
    q = torch.randn(2, 3, 5, 16)
    attention.attention(q, q, q, True, None, 0.25)
    attention.attention_varlen(q[0], q[0], q[0], torch.tensor([0, 1, 2], dtype=torch.int32), 1, False, 0.25)
    decode_attention.decode_attention(q[:, :, :1], q, q, torch.tensor([2, 5], dtype=torch.int32), 0.25)
    softmax.softmax(torch.randn(4, 9), -1, 1.0, None)
    softmax.softmax(torch.randn(2, 40000), -1, 1.0, None)  # the online kernel
    layer_norm.layer_norm(torch.randn(4, 8), torch.ones(8), torch.zeros(8), 1e-5)
    ffn.linear(torch.randn(4, 8), torch.randn(16, 8), torch.randn(16))
    assert len(log) == 8 and all(inside for _, inside in log), log
    assert len(guards) == 7 and all(d.type == "cpu" for d in guards)


def test_device_guard_selects_the_tensors_gpu(monkeypatch):
    from fastlm.kernels.utils import device_guard

    entered = []

    class FakeDevice:
        def __init__(self, d):
            entered.append(torch.device(d))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class OnCuda1:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with device_guard(OnCuda1()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with device_guard(torch.empty(1)):  # CPU: no CUDA call at all
        pass
    assert entered == [torch.device("cuda", 1)]
