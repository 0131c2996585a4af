"""Prometheus metrics of one server (prometheus_client, a registry per app so tests can build
several apps in one process). Names carry the prefix `fastlm_`; durations are in seconds."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fastlm_requests", "requests received, by route", ["route"], registry=r)
        self.success = Counter("fastlm_request_success", "requests answered 2xx, by route", ["route"], registry=r)
        self.failure = Counter("fastlm_request_failure", "requests failed, by route and reason "
                               "(validation, too_large, overloaded, unauthorized, timeout, aborted, disconnected, "
                               "backend, unavailable)", ["route", "reason"], registry=r)
        self.in_flight = Gauge("fastlm_requests_in_flight", "model-route requests being served (the bound of "
                               "--max-concurrent-requests)", registry=r)
        self.queue_size = Gauge("fastlm_queue_size", "requests waiting for the engine", registry=r)
        self.running = Gauge("fastlm_running", "requests (sequences) in the running batch", registry=r)
        self.batch_size = Histogram("fastlm_batch_size", "sequences per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("fastlm_batch_tokens", "tokens per model call (padded)",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.ttft = Histogram("fastlm_time_to_first_token_seconds", "request received to first token",
                              buckets=_LAT, registry=r)
        self.itl = Histogram("fastlm_inter_token_latency_seconds", "time between two tokens of a sequence",
                             buckets=_LAT, registry=r)
        self.e2e = Histogram("fastlm_e2e_request_latency_seconds", "request received to response done, by route",
                             ["route"], buckets=_LAT, registry=r)
        self.tokenize = Histogram("fastlm_tokenization_seconds", "tokenization time per request",
                                  buckets=_LAT, registry=r)
        self.queue_time = Histogram("fastlm_queue_seconds", "time a request waits before its first model call",
                                    buckets=_LAT, registry=r)
        self.inference = Histogram("fastlm_inference_seconds", "time of one model call (a batch, a prefill or "
                                   "a decode step)", ["kind"], buckets=_LAT, registry=r)
        self.prompt_tokens = Counter("fastlm_prompt_tokens", "input tokens processed", registry=r)
        self.generation_tokens = Counter("fastlm_generation_tokens", "tokens generated", registry=r)
