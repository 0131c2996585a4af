"""Issue 12.4: generation defaults come from the checkpoint (generation_config.json, then config),
explicit arguments override; eos may be a list; min_new_tokens and repetition_penalty follow
transformers. Greedy output equals transformers' generate on the same directory (fp32), on the
CPU path and with the kernels on the Triton interpreter."""

import json

import pytest
import torch
import transformers as tf

import fastlm

CFG = {"n_layer": 2, "n_head": 3, "n_embd": 96, "vocab_size": 101, "n_positions": 96, "initializer_range": 0.4}


def save(path, gen=None, **cfg):
    """A random GPT-2 (init 0.4) saved by transformers; generation_config.json rewritten to `gen`."""
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(**{**CFG, **cfg})).eval()
    hf.save_pretrained(path)
    if gen is not None:
        (path / "generation_config.json").write_text(json.dumps(gen))
    elif (path / "generation_config.json").exists():
        (path / "generation_config.json").unlink()
    return hf


def left_padded(V=101):
    lens = [9, 4, 7]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, 9 - n:], mask[b, 9 - n:] = torch.randint(1, V, (n,)), 1
    return ids, mask


def hf_gen(path, ids, mask, **kw):
    hf = tf.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, **kw)


def free_run(path, ids, mask, n=16):
    """Greedy tokens with no eos at all, to choose eos ids the model really makes."""
    return hf_gen(path, ids, mask, max_new_tokens=n, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]


def fresh(free, row, start=2):
    """A token row `row` makes at step >= start that no row made before that step, so it ends
    that row there, and no earlier."""
    for k in range(start, free.shape[1]):
        t = int(free[row, k])
        if t not in free[:, :k].flatten().tolist():
            return t
    raise AssertionError("no fresh token: the reference is too repetitive")


def test_checkpoint_eos_and_pad_stop_generation_like_transformers(tmp_path):
    save(tmp_path, gen={})
    ids, mask = left_padded()
    free = free_run(tmp_path, ids, mask)
    assert len(set(free.flatten().tolist())) >= 8, "reference too repetitive to be a test"
    eos = [fresh(free, 0, 3), fresh(free, 2, 5)]  # ids two rows make
    save_gen = {"eos_token_id": eos, "pad_token_id": 7, "bos_token_id": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps(save_gen))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(eos_token_id=eos[0], pad_token_id=7)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    expect = hf_gen(tmp_path, ids, mask, max_new_tokens=12)  # transformers reads the same files
    model = fastlm.from_pretrained(tmp_path)
    assert model.generation_config.eos_token_id == eos
    got = model.generate(ids, mask, max_new_tokens=12)  # no eos given: the checkpoint's
    assert torch.equal(got, expect)
    assert (got[:, 9:] == 7).any(), "a finished row is padded with the checkpoint's pad id"
    # explicit arguments override the checkpoint
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12, eos_token_id=[]),
                       torch.cat([ids, free[:, :12]], 1))
    one = model.generate(ids, mask, max_new_tokens=12, eos_token_id=eos[1], pad_token_id=3)
    assert torch.equal(one, hf_gen(tmp_path, ids, mask, max_new_tokens=12, eos_token_id=eos[1], pad_token_id=3))
    # stream follows the same defaults
    steps = torch.stack(list(model.stream(ids, mask, max_new_tokens=12)), 1)
    assert torch.equal(steps, got[:, 9:])


def test_config_only_checkpoint_and_generation_config_max_new_tokens(tmp_path):
    hf = save(tmp_path, gen=None)  # no generation_config.json: transformers derives one from config
    ids, mask = left_padded()
    free = free_run(tmp_path, ids, mask)
    cfg = json.loads((tmp_path / "config.json").read_text())
    eos = fresh(free, 1, 2)
    cfg.update(eos_token_id=eos, pad_token_id=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    expect = hf_gen(tmp_path, ids, mask, max_new_tokens=10)
    model = fastlm.from_pretrained(tmp_path)
    got = model.generate(ids, mask, max_new_tokens=10)
    assert torch.equal(got, expect)
    assert got.shape[1] < 19 or (got[1, -1] == eos)  # padded with eos when there is no pad id
    # max_new_tokens from generation_config.json when not given
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5, "eos_token_id": None}))
    model = fastlm.from_pretrained(tmp_path)
    assert torch.equal(model.generate(ids, mask), hf_gen(tmp_path, ids, mask, pad_token_id=0))
    assert model.generate(ids, mask).shape == (3, 14)
    del hf


def test_model_object_brings_its_generation_config():
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(**CFG)).eval()
    ids, mask = left_padded()
    with torch.no_grad():
        free = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 9:]
    hf.generation_config.eos_token_id = [fresh(free, 0, 4), fresh(free, 1, 1)]
    hf.generation_config.pad_token_id = 5
    model = fastlm.from_pretrained(hf)
    with torch.no_grad():
        expect = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12), expect)
    assert expect.shape[1] < 9 + 12 or (expect[:, 9:] == 5).any()


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_min_new_tokens_and_eos_list_equal_transformers(tmp_path, backend, device):
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    free = free_run(tmp_path, ids, mask)
    eos = [fresh(free, 0, 1), fresh(free, 1, 0), fresh(free, 2, 2)]  # rows would stop early
    model = fastlm.from_pretrained(tmp_path, device=device)
    for min_new in (0, 2, 6) if backend == "auto" else (6,):  # the interpreter is slow
        expect = hf_gen(tmp_path, ids, mask, max_new_tokens=14, eos_token_id=eos, min_new_tokens=min_new)
        with fastlm.use_backend(backend):
            got = model.generate(ids.to(device), mask.to(device), max_new_tokens=14, eos_token_id=eos,
                                 min_new_tokens=min_new)
        assert torch.equal(got.cpu(), expect), f"min_new_tokens={min_new}"
        if min_new == 6:
            assert not any(t in eos for t in got[:, 9:15].flatten().tolist())  # no eos before 6 new tokens


@pytest.mark.parametrize("backend,penalty", [("auto", 1.5), ("auto", 0.7), ("triton", 1.5)])
def test_repetition_penalty_equals_transformers(tmp_path, backend, device, penalty):
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    ids[0, :3] = ids[0, 3:6]  # repeated tokens in the prompt
    model = fastlm.from_pretrained(tmp_path, device=device)
    expect = hf_gen(tmp_path, ids, mask, max_new_tokens=16, repetition_penalty=penalty)
    with fastlm.use_backend(backend):
        got = model.generate(ids.to(device), mask.to(device), max_new_tokens=16, repetition_penalty=penalty)
        plain = model.generate(ids.to(device), mask.to(device), max_new_tokens=16)
    assert torch.equal(got.cpu(), expect)
    assert not torch.equal(got, plain), "the penalty changed nothing: this test could not fail"


def test_repetition_penalty_from_the_checkpoint_with_eos(tmp_path):
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    free = free_run(tmp_path, ids, mask)
    gen = {"repetition_penalty": 1.3, "eos_token_id": [fresh(free, 2, 4)], "pad_token_id": 2, "min_new_tokens": 2,
           "min_length": 9 + 5}  # min_length counts the (padded) prompt, as transformers does
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    model = fastlm.from_pretrained(tmp_path)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=16), hf_gen(tmp_path, ids, mask, max_new_tokens=16))


def test_bad_generation_arguments(tmp_path):
    save(tmp_path, gen={"eos_token_id": 3})
    model = fastlm.from_pretrained(tmp_path)
    ids = torch.randint(1, 101, (2, 5))
    for kw, msg in [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be"),
        ({"min_new_tokens": -1}, "min_new_tokens must be"),
        ({"eos_token_id": [3, 101]}, r"eos_token_id must be a token id in \[0, 101\) or a list"),
        ({"eos_token_id": 2.0}, "eos_token_id must be"),
        ({"pad_token_id": -2}, "pad_token_id must be"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model.generate(ids, max_new_tokens=3, **kw)
    with pytest.raises(ValueError, match="max_length must be"):
        model.generate(ids, max_length=0)
    with pytest.raises(ValueError, match="min_new_tokens must be"):
        model.stream(ids, min_new_tokens=-1)  # checked before the first token, not at the first next()


def test_cli_generate_stops_at_the_checkpoints_eos(tmp_path, capsys):
    from fastlm.cli import main

    save(tmp_path, gen={"pad_token_id": 0})
    ids = torch.randint(1, 101, (1, 6))
    free = free_run(tmp_path, ids, torch.ones_like(ids))
    eos = fresh(free, 0, 3)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0}))
    expect = hf_gen(tmp_path, ids, torch.ones_like(ids), max_new_tokens=12)[0, 6:].tolist()
    assert expect[-1] == eos and len(expect) < 12
    prompt = ",".join(map(str, ids[0].tolist()))
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", prompt, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert f"{len(expect)} new tokens" in out, out  # stopped where transformers stops


def test_checkpoint_min_length_counts_the_prompt_like_transformers(tmp_path):
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    free = free_run(tmp_path, ids, mask)
    eos = [fresh(free, 0, 1), fresh(free, 1, 1)]  # rows 0 and 1 would stop at their 2nd token
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0,
                                                                 "min_length": 9 + 4}))
    model = fastlm.from_pretrained(tmp_path)
    got = model.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(got, hf_gen(tmp_path, ids, mask, max_new_tokens=12))
    assert not any(t in eos for t in got[:, 9:13].flatten().tolist())  # no eos in the first 4 new tokens
    assert any(t in eos for t in got[:, 13:].flatten().tolist())  # and it does come after
