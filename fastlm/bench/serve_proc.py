"""The server processes and latency statistics behind `fastlm bench --suite serve`
(fastlm/bench/serve.py): start a server on a free 127.0.0.1 port, wait on /health, stop it, and
percentiles of latencies in seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1:port whose output goes to a temporary file; wait() polls
    `health` (a GET route) until it answers 200 (or the process exits: its last output is the error),
    stop() sends SIGTERM, then kills after 30 s."""

    def __init__(self, argv: list[str], port: int, env: dict | None = None, health: str = "/health",
                 route: str = "/v1/embeddings"):
        self.url = f"http://127.0.0.1:{port}"
        self.health, self.route = health, route  # route: its OpenAI-compatible embeddings route
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait(self, timeout=300):
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()[-2000:].decode(errors='replace')}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy within {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def fastlm_server(model: str, *args: str, threads: int) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-m", "fastlm", "serve", "--model", model, "--port", str(port), "--log-level",
                  "warning", *args], port, env={"OMP_NUM_THREADS": str(threads)})


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def stats(name: str, xs: list[float]) -> dict:
    return {f"{name}_p50": pct(xs, 50), f"{name}_p90": pct(xs, 90), f"{name}_p99": pct(xs, 99)}
