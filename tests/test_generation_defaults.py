"""Issue 12.4: generation defaults come from the checkpoint (generation_config.json, then config),
explicit arguments override; eos may be a list; min_new_tokens and repetition_penalty follow
transformers. Greedy output equals transformers' generate on the same directory (fp32), on the
CPU path and with the kernels on the Triton interpreter.

Issue 23.2: every parameter resolves as transformers 5's generate resolves it (its defaults: 20 new
tokens, top_k 50), each logits processor it builds gives its tokens, seeded sampling stays in its
filtered support, and what fastlm does not implement raises naming it."""

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


# -- Issue 23.2: every generation parameter resolved as transformers 5 resolves it --------------------


def test_fastlm_defaults_are_transformers_defaults():
    """fastlm.generation.DEFAULTS copies transformers' generate-time defaults: the installed
    transformers must agree (a new release changing one would otherwise go unnoticed)."""
    from fastlm.generation import DEFAULTS

    theirs = tf.GenerationConfig._get_default_generation_params()
    assert {k: theirs[k] for k in DEFAULTS} == DEFAULTS
    assert DEFAULTS["top_k"] == 50 and DEFAULTS["max_length"] == 20


def test_no_length_given_makes_20_new_tokens_like_transformers(tmp_path):
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    model = fastlm.from_pretrained(tmp_path)
    expect = hf_gen(tmp_path, ids, mask)  # transformers: max_length 20 + the (padded) prompt
    assert expect.shape == (3, 9 + 20)
    assert len(set(expect[:, 9:].flatten().tolist())) >= 10, "reference too repetitive to be a test"
    assert torch.equal(model.generate(ids, mask), expect)
    assert torch.equal(torch.stack(list(model.stream(ids, mask)), 1), expect[:, 9:])
    # near the end of the positions (96) the default stops there, as transformers' does
    long_ids = torch.randint(1, 101, (1, 85))
    expect = hf_gen(tmp_path, long_ids, torch.ones_like(long_ids))
    assert expect.shape == (1, 96)
    assert torch.equal(model.generate(long_ids), expect)
    with pytest.raises(ValueError, match="fills the model's 96 positions"):
        model.generate(torch.randint(1, 101, (1, 96)))


@pytest.mark.parametrize("where", ["call", "checkpoint"])
def test_max_length_counts_the_padded_prompt_like_transformers(tmp_path, where):
    save(tmp_path, gen={"pad_token_id": 0, **({"max_length": 16} if where == "checkpoint" else {})})
    ids, mask = left_padded()
    model = fastlm.from_pretrained(tmp_path)
    kw = {"max_length": 16} if where == "call" else {}
    expect = hf_gen(tmp_path, ids, mask, **kw)
    assert expect.shape == (3, 16)  # 9 prompt columns (padding included) + 7 new
    assert torch.equal(model.generate(ids, mask, **kw), expect)
    # max_new_tokens wins over max_length, as in transformers
    both = hf_gen(tmp_path, ids, mask, max_new_tokens=4, max_length=40)
    assert both.shape == (3, 13) and torch.equal(model.generate(ids, mask, max_new_tokens=4, max_length=40), both)
    with pytest.raises(ValueError):  # transformers refuses a max_length the prompt already fills
        hf_gen(tmp_path, ids, mask, max_length=9)
    with pytest.raises(ValueError, match=r"max_length \(9\) counts the prompt \(9 tokens"):
        model.generate(ids, mask, max_length=9)


def processor_cases(free, V=101):
    """(name, kwargs, can change greedy tokens) for each logits processor, the arguments chosen from
    `free` (B, n), the tokens greedy search makes without them, so that each one bites."""
    absent = next(t for t in range(1, V) if t not in free.flatten().tolist())  # a token no row makes
    f = free.tolist()
    return [
        ("no_repeat_ngram_size=1", {"no_repeat_ngram_size": 1}, True),
        ("no_repeat_ngram_size=2", {"no_repeat_ngram_size": 2, "max_new_tokens": 40}, True),
        ("bad_words_ids", {"bad_words_ids": [[f[0][3]], [f[1][4], f[1][5]]]}, True),
        ("sequence_bias", {"sequence_bias": [[[f[0][0]], -100.0], [[f[1][4], f[1][5]], -100.0], [[f[2][1]], 2.5]]},
         True),
        ("suppress_tokens", {"suppress_tokens": [f[0][0], f[1][2]]}, True),
        ("begin_suppress_tokens", {"begin_suppress_tokens": [f[0][0], f[2][0]]}, True),
        ("forced_eos_token_id", {"forced_eos_token_id": [(f[0][-1] + 1) % V, (f[0][-1] + 2) % V]}, True),
        ("encoder_repetition_penalty", {"encoder_repetition_penalty": 3.0}, True),
        ("repetition_penalty+no_repeat+bad_words", {"repetition_penalty": 1.4, "no_repeat_ngram_size": 3,
                                                    "bad_words_ids": [[f[2][2]]]}, True),
        ("min_length", {"eos_token_id": [fresh(free, 0, 1)], "min_length": 9 + 6}, True),
        ("min_new_tokens over min_length", {"eos_token_id": [fresh(free, 0, 1)], "min_new_tokens": 3,
                                            "min_length": 9 + 8}, True),
        ("exponential_decay_length_penalty", {"eos_token_id": absent, "exponential_decay_length_penalty": [3, 4.0]},
         True),
        # these two change no greedy token by construction (an -inf becomes the float minimum; a log-softmax
        # keeps the order): checked for equality only
        ("remove_invalid_values", {"remove_invalid_values": True, "suppress_tokens": [f[0][0]]}, False),
        ("renormalize_logits", {"renormalize_logits": True}, False),
    ]


@pytest.mark.parametrize("where", ["call", "checkpoint"])
def test_greedy_logits_processors_equal_transformers_on_a_padded_batch(tmp_path, where):
    """Each logits processor transformers builds from a call argument or from generation_config.json
    gives transformers' tokens, on a left-padded batch (lengths and n-grams count the padding)."""
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    free = free_run(tmp_path, ids, mask, n=20)
    assert len(set(free.flatten().tolist())) >= 10, "reference too repetitive to be a test"
    plain = torch.cat([ids, free], 1)
    for name, kw, bites in processor_cases(free):
        gen = {"pad_token_id": 0}
        if where == "checkpoint":
            gen.update(kw)
            kw = {}
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
        expect = hf_gen(tmp_path, ids, mask, **kw)
        got = fastlm.from_pretrained(tmp_path).generate(ids, mask, **kw)
        assert torch.equal(got, expect), name
        if bites:
            assert not torch.equal(expect, plain[:, :expect.shape[1]]) or expect.shape != plain.shape, \
                f"{name} changed nothing: this case could not fail"


def test_forced_bos_and_begin_suppress_after_a_one_token_prompt(tmp_path):
    """forced_bos_token_id acts on a 1-token prompt, and begin_suppress_tokens then acts one step
    later (the token after the bos), as in transformers."""
    save(tmp_path, gen={"pad_token_id": 0})
    ids = torch.randint(1, 101, (4, 1))
    free = free_run(tmp_path, ids, torch.ones_like(ids), n=12)
    model = fastlm.from_pretrained(tmp_path)
    bos = (int(free[0, 0]) + 1) % 101
    forced = hf_gen(tmp_path, ids, None, forced_bos_token_id=bos, max_new_tokens=12)
    assert (forced[:, 1] == bos).all() and not torch.equal(forced[:, 1:], free)
    assert torch.equal(model.generate(ids, forced_bos_token_id=bos, max_new_tokens=12), forced)
    kw = {"forced_bos_token_id": bos, "begin_suppress_tokens": forced[:, 2].tolist(), "max_new_tokens": 12}
    expect = hf_gen(tmp_path, ids, None, **kw)
    assert (expect[:, 1] == bos).all() and not (expect[:, 2] == forced[:, 2]).any()  # suppressed after the bos
    assert torch.equal(model.generate(ids, **kw), expect)


def test_right_padding_reads_as_the_same_prompts_left_padded(tmp_path):
    """Processors that read the sequence (n-grams, multi-token bad words) see a right-padded batch as
    transformers sees the same prompts left-padded: same padding ids, same lengths."""
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(3):
        n = int(mask[b].sum())
        right_ids[b, :n], right_mask[b, :n] = ids[b, 9 - n:], 1
    free = free_run(tmp_path, ids, mask, n=20)
    # the bad word starts with row 1's last prompt token: it bans row 1's first new token only when
    # that prompt token is read as the last one before the new tokens (row 1 has 5 padding columns)
    kw = {"no_repeat_ngram_size": 2, "bad_words_ids": [[int(ids[1, -1]), int(free[1, 0])]], "max_new_tokens": 30}
    expect = hf_gen(tmp_path, ids, mask, **kw)
    assert expect[1, 9] != free[1, 0]
    got = fastlm.from_pretrained(tmp_path).generate(right_ids, right_mask, **kw)
    assert torch.equal(got[:, :9], right_ids) and torch.equal(got[:, 9:], expect[:, 9:])


def test_generation_config_argument_like_transformers(tmp_path):
    """A GenerationConfig passed to generate sits between the call's arguments and the checkpoint's."""
    save(tmp_path, gen={"pad_token_id": 0, "max_new_tokens": 30, "no_repeat_ngram_size": 2})
    ids, mask = left_padded()
    model = fastlm.from_pretrained(tmp_path)
    gc = tf.GenerationConfig(max_new_tokens=12, no_repeat_ngram_size=1)
    expect = hf_gen(tmp_path, ids, mask, generation_config=gc)
    assert expect.shape == (3, 21)
    assert torch.equal(model.generate(ids, mask, generation_config=gc), expect)
    expect = hf_gen(tmp_path, ids, mask, generation_config=gc, max_new_tokens=5)
    assert torch.equal(model.generate(ids, mask, generation_config=gc, max_new_tokens=5), expect)
    with pytest.raises(TypeError, match="generation_config must be a transformers GenerationConfig"):
        model.generate(ids, mask, generation_config={"max_new_tokens": 3})


def hf_support(path, ids, mask, new, **kw):
    """(B, n, V) bool: the tokens transformers' sampling could draw at each step of `new` (B, n),
    read from its processed scores (output_scores: after every processor and warper) on the prefix
    ids + new[:, :k]."""
    hf = tf.GPT2LMHeadModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for k in range(new.shape[1]):
            seq = torch.cat([ids, new[:, :k]], 1)
            m = torch.cat([mask, torch.ones_like(new[:, :k])], 1)
            r = hf.generate(seq, attention_mask=m, max_new_tokens=1, do_sample=True, output_scores=True,
                            return_dict_in_generate=True, **kw)
            out.append(torch.isfinite(r.scores[0]))
    return torch.stack(out, 1)


def in_support(support, new):
    return support.gather(2, new[..., None])[..., 0]  # (B, n) bool


@pytest.mark.parametrize("kw", [
    {},  # transformers' defaults: top_k 50
    {"temperature": 4.0},  # flat: the top-50 filter decides the support
    {"temperature": 3.0, "top_k": 30, "top_p": 0.8},
    {"temperature": 3.0, "min_p": 0.2},
    {"temperature": 3.0, "top_p": 0.9, "repetition_penalty": 1.5, "no_repeat_ngram_size": 1},
], ids=["defaults", "temperature", "top_k+top_p", "min_p", "penalties"])
def test_seeded_sampling_stays_in_transformers_filtered_support(tmp_path, kw):
    save(tmp_path, gen={"pad_token_id": 0}, vocab_size=257)
    ids, mask = left_padded(V=257)
    model = fastlm.from_pretrained(tmp_path)
    new = model.generate(ids, mask, do_sample=True, seed=int(torch.randint(0, 2**31, ())), **kw)[:, 9:]
    assert new.shape == (3, 20)  # the default length when sampling too
    support = hf_support(tmp_path, ids, mask, new, **kw)
    assert support.sum(-1).max() <= 50 and support.sum(-1).min() >= 1  # a real filter (V = 257)
    inside = in_support(support, new)
    assert inside.all(), f"{int((~inside).sum())} of {inside.numel()} sampled tokens outside transformers' support"
    greedy = model.generate(ids, mask, **{k: v for k, v in kw.items() if k in ("repetition_penalty",
                                                                                "no_repeat_ngram_size")})
    assert not torch.equal(new, greedy[:, 9:]), "sampling made the greedy tokens: this test could not fail"


def test_sampling_without_the_top_k_default_leaves_transformers_support(tmp_path):
    """The check above can fail: the whole-vocabulary sampling fastlm did before (top_k 0) draws
    tokens outside transformers' default top-50 support."""
    save(tmp_path, gen={"pad_token_id": 0}, vocab_size=257)
    ids, mask = left_padded(V=257)
    model = fastlm.from_pretrained(tmp_path)
    new = model.generate(ids, mask, do_sample=True, top_k=0, temperature=4.0, seed=7)[:, 9:]
    inside = in_support(hf_support(tmp_path, ids, mask, new, temperature=4.0), new)
    assert not inside.all()


def test_refused_and_ignored_options(tmp_path):
    """An option fastlm does not implement raises ValueError naming it, from the call or the
    checkpoint, before any work; an option that changes no token of greedy / sampling is accepted
    (and the tokens stay transformers'); an unknown name raises TypeError naming it."""
    save(tmp_path, gen={"pad_token_id": 0})
    ids, mask = left_padded()
    model = fastlm.from_pretrained(tmp_path)
    refused = [({"num_beams": 4}, "num_beams"), ({"num_beam_groups": 2}, "num_beam_groups"),
               ({"penalty_alpha": 0.6}, "penalty_alpha"), ({"num_return_sequences": 2}, "num_return_sequences"),
               ({"do_sample": True, "typical_p": 0.9}, "typical_p"),
               ({"do_sample": True, "epsilon_cutoff": 3e-4}, "epsilon_cutoff"),
               ({"do_sample": True, "eta_cutoff": 3e-4}, "eta_cutoff"), ({"do_sample": True, "top_h": 0.5}, "top_h"),
               ({"guidance_scale": 1.5}, "guidance_scale"), ({"constraints": []}, "constraints"),
               ({"force_words_ids": [[3]]}, "force_words_ids"), ({"dola_layers": "high"}, "dola_layers"),
               ({"encoder_no_repeat_ngram_size": 2}, "encoder_no_repeat_ngram_size"),
               ({"output_scores": True}, "output_scores"), ({"output_logits": True}, "output_logits"),
               ({"return_dict_in_generate": True}, "return_dict_in_generate"), ({"max_time": 1.0}, "max_time"),
               ({"stop_strings": ["x"]}, "stop_strings"), ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
               ({"token_healing": True}, "token_healing"),
               ({"watermarking_config": {"bias": 2.0}}, "watermarking_config"),
               ({"logits_processor": [lambda i, s: s]}, "logits_processor"),
               ({"stopping_criteria": [lambda i, s: False]}, "stopping_criteria"),
               ({"prefix_allowed_tokens_fn": lambda b, i: [1]}, "prefix_allowed_tokens_fn"),
               ({"assistant_model": object()}, "assistant_model"), ({"streamer": object()}, "streamer")]
    for kw, name in refused:
        with pytest.raises(ValueError, match=rf"{name}=.* is not supported by fastlm"):
            model.generate(ids, mask, **kw)
        with pytest.raises(ValueError, match=rf"{name}=.* is not supported by fastlm"):
            model.stream(ids, mask, **kw)  # at the call, not at the first next()
    for gen, name in [({"num_beams": 3}, "num_beams"), ({"do_sample": True, "typical_p": 0.5}, "typical_p"),
                      ({"guidance_scale": 3.0}, "guidance_scale")]:
        (tmp_path / "generation_config.json").write_text(json.dumps({"pad_token_id": 0, **gen}))
        with pytest.raises(ValueError, match=rf"{name}=.* is not supported by fastlm"):
            fastlm.from_pretrained(tmp_path).generate(ids, mask)
    # sampling-only warpers on a greedy checkpoint, and options that change no token: accepted
    (tmp_path / "generation_config.json").write_text(json.dumps({"pad_token_id": 0, "typical_p": 0.5,
                                                                 "epsilon_cutoff": 3e-4, "num_beams": 1}))
    kw = {"use_cache": False, "length_penalty": 2.0, "early_stopping": True, "cache_implementation": "static",
          "max_new_tokens": 10}
    expect = hf_gen(tmp_path, ids, mask, **kw)
    assert torch.equal(fastlm.from_pretrained(tmp_path).generate(ids, mask, **kw), expect)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_new_token'"):
        model.generate(ids, mask, max_new_token=5)


def test_bad_processor_arguments_name_the_argument(tmp_path):
    save(tmp_path, gen={"pad_token_id": 0})
    model = fastlm.from_pretrained(tmp_path)
    ids = torch.randint(1, 101, (2, 5))
    for kw, msg in [
        ({"max_length": 2.5}, "max_length must be an int"),
        ({"min_length": -1}, "min_length must be an int >= 0"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be"),
        ({"no_repeat_ngram_size": 1.5}, "no_repeat_ngram_size must be"),
        ({"bad_words_ids": []}, "bad_words_ids must be a non-empty list"),
        ({"bad_words_ids": [[3, 101]]}, r"bad_words_ids must be a list of token ids in \[0, 101\)"),
        ({"bad_words_ids": [3]}, "bad_words_ids must be a list of token ids"),
        ({"sequence_bias": {(3,): "x"}}, "sequence_bias must be"),
        ({"sequence_bias": {(300,): 1.0}}, "sequence_bias must be"),
        ({"sequence_bias": []}, "sequence_bias must be"),
        ({"suppress_tokens": [-1]}, "suppress_tokens must be a list of token ids"),
        ({"begin_suppress_tokens": 3}, "begin_suppress_tokens must be a list"),
        ({"forced_bos_token_id": 101}, "forced_bos_token_id must be a token id"),
        ({"forced_eos_token_id": [1, -1]}, "forced_eos_token_id must be a list of token ids"),
        ({"encoder_repetition_penalty": 0.0}, "encoder_repetition_penalty must be"),
        ({"exponential_decay_length_penalty": (2, 1.5)}, "exponential_decay_length_penalty needs an eos_token_id"),
        ({"exponential_decay_length_penalty": (2,), "eos_token_id": 3}, "exponential_decay_length_penalty must be"),
        ({"do_sample": True, "min_p": 1.5}, "min_p must lie in"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model.generate(ids, max_new_tokens=3, **kw)
    with pytest.raises(TypeError, match="remove_invalid_values must be a bool"):
        model.generate(ids, max_new_tokens=3, remove_invalid_values="yes")


def test_without_a_mask_pad_ids_are_padding_like_transformers(tmp_path):
    """With no attention_mask, transformers reads the pad_token_id tokens as padding (when the pad id
    is no eos id); fastlm does the same, so a left-padded batch without its mask gives the tokens it
    gives with it."""
    save(tmp_path, gen={"pad_token_id": 7})
    ids, mask = left_padded()
    ids[mask == 1] = torch.where(ids[mask == 1] == 7, 8, ids[mask == 1])  # 7 only as padding
    ids[mask == 0] = 7
    model = fastlm.from_pretrained(tmp_path)
    expect = hf_gen(tmp_path, ids, None, max_new_tokens=12)
    assert torch.equal(expect, hf_gen(tmp_path, ids, mask, max_new_tokens=12))
    assert torch.equal(model.generate(ids, max_new_tokens=12), expect)
    all_ones = model.generate(ids, torch.ones_like(ids), max_new_tokens=12)
    assert not torch.equal(all_ones, expect), "the padding changed nothing: this test could not fail"
    # a pad id that is also an eos id tells nothing: every token counts, as in transformers
    kw = {"max_new_tokens": 12, "eos_token_id": [7, 9]}
    assert torch.equal(model.generate(ids, **kw), hf_gen(tmp_path, ids, None, **kw))
