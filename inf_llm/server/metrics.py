"""Prometheus metrics of one app (its own CollectorRegistry: two apps in one process never share state).

requests running/queued (read from the engine at scrape time), time to first token, prefill and decode
tokens/s, prompt/cached/generated tokens, finished requests by outcome, refused requests by reason.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inf_llm.engine.events import Done, Error

# Buckets: TTFT from tens of milliseconds (GPU, cached prompt) to minutes (100K-token CPU prefill).
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 5000)
PROMPT_BUCKETS = (64, 256, 1024, 4096, 16384, 32768, 65536, 131072, 262144, 1048576)


class Metrics:
    def __init__(self, running: Callable[[], float], queued: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        running_gauge = Gauge("inf_llm_requests_running", "Requests being generated (0 or 1: one worker)", registry=r)
        running_gauge.set_function(running)
        Gauge("inf_llm_requests_queued", "Requests waiting for the worker", registry=r).set_function(queued)
        self.finished = Counter("inf_llm_requests_finished", "Finished generation requests", ["outcome"], registry=r)
        self.refused = Counter("inf_llm_requests_refused", "Requests refused before generation", ["reason"], registry=r)
        self.ttft = Histogram("inf_llm_time_to_first_token_seconds", "Submission to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.decode_rate = Histogram("inf_llm_decode_tokens_per_second", "Decode speed per request",
                                     buckets=RATE_BUCKETS, registry=r)
        self.prefill_rate = Histogram("inf_llm_prefill_tokens_per_second", "Prefill speed per request (new tokens)",
                                      buckets=RATE_BUCKETS, registry=r)
        self.prompt_size = Histogram("inf_llm_request_prompt_tokens", "Prompt length per request",
                                     buckets=PROMPT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("inf_llm_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("inf_llm_cached_prompt_tokens", "Prompt tokens reused from memory", registry=r)
        self.generated_tokens = Counter("inf_llm_generated_tokens", "Generated tokens", registry=r)

    def record(self, final: Done | Error | None) -> None:
        """Called by the engine's worker thread when a job ends (prometheus_client is thread-safe)."""
        if final is None:
            return
        if isinstance(final, Error):
            self.finished.labels(outcome="error").inc()
            return
        self.finished.labels(outcome=final.finish_reason).inc()
        u, t = final.usage, final.timings
        self.prompt_size.observe(u.prompt_tokens)
        self.prompt_tokens.inc(u.prompt_tokens)
        self.cached_tokens.inc(u.cached_tokens)
        self.generated_tokens.inc(u.completion_tokens)
        if t.ttft_ms is not None:
            self.ttft.observe(t.ttft_ms / 1000.0)
        if t.decode_tokens_per_s is not None:
            self.decode_rate.observe(t.decode_tokens_per_s)
        if t.prefill_tokens_per_s is not None and u.prompt_tokens > u.cached_tokens:
            self.prefill_rate.observe(t.prefill_tokens_per_s)

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)
