"""/metrics: the engine's counters and gauges, and every answered request (RequestCounts, kept by the Guard
middleware), in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

UNCOUNTED = ("/health", "/metrics")  # monitoring's own polls are not requests


class RequestCounts:
    """Every request answered, whoever answered it (a route, an exception handler, the Guard's 500, the body
    deadline's 408), by HTTP status; and streams that ended with an error event after their 200 began. Only
    uvicorn's own answers (its 503 past --max-connections, its 400 for a malformed head) never reach the app."""

    def __init__(self):
        self.statuses: dict[int, int] = {}
        self.stream_errors: dict[int, int] = {}  # by the status the error event carries

    def answered(self, path: str, status: int) -> None:
        if path not in UNCOUNTED:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def stream_error(self, status: int) -> None:
        self.stream_errors[status] = self.stream_errors.get(status, 0) + 1

    def lines(self) -> list[str]:
        total = sum(self.statuses.values())
        errors = sum(n for s, n in self.statuses.items() if s >= 400) + sum(self.stream_errors.values())
        return [
            "# TYPE qwen35_requests_total counter", f"qwen35_requests_total {total}",
            "# TYPE qwen35_request_errors_total counter", f"qwen35_request_errors_total {errors}",
            "# TYPE qwen35_responses_total counter",
            *(f'qwen35_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.statuses.items())),
            "# TYPE qwen35_stream_errors_total counter",
            *(f'qwen35_stream_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.stream_errors.items())),
        ]


def prometheus_text(engine, counts: RequestCounts) -> str:
    """Requests (answered, failed, by status), tokens (prompt, reused from the prompt cache, generated), queue
    and batch sizes, reserved memory against the budget, time to first token, decode speed (tokens, drafts
    accepted included, per second of decode steps, all rows together), and speculative decoding's counts."""
    s = engine.stats
    lines = counts.lines() + [
        "# TYPE qwen35_prompt_tokens_total counter", f"qwen35_prompt_tokens_total {s['prompt_tokens']}",
        "# TYPE qwen35_cached_prompt_tokens_total counter",
        f"qwen35_cached_prompt_tokens_total {s['cached_tokens']}",
        "# TYPE qwen35_generated_tokens_total counter", f"qwen35_generated_tokens_total {s['generated_tokens']}",
        "# TYPE qwen35_queue_depth gauge", f"qwen35_queue_depth {engine.queue_depth}",
        "# TYPE qwen35_active_sequences gauge", f"qwen35_active_sequences {len(engine.active)}",
        "# TYPE qwen35_prefilling_sequences gauge", f"qwen35_prefilling_sequences {len(engine.feeding)}",
        "# TYPE qwen35_memory_reserved_bytes gauge", f"qwen35_memory_reserved_bytes {engine.reserved_bytes}",
    ] + ([
        "# TYPE qwen35_memory_budget_bytes gauge", f"qwen35_memory_budget_bytes {engine.memory_budget}",
    ] if engine.memory_budget is not None else []) + [
        "# TYPE qwen35_time_to_first_token_seconds summary",
        f"qwen35_time_to_first_token_seconds_sum {s['ttft_sum']:.6f}",
        f"qwen35_time_to_first_token_seconds_count {s['ttft_count']}",
        "# TYPE qwen35_decode_tokens_per_second gauge",
        f"qwen35_decode_tokens_per_second {s['decode_tokens'] / s['decode_time'] if s['decode_time'] else 0:.3f}",
        "# TYPE qwen35_decode_steps_total counter", f"qwen35_decode_steps_total {s['decode_steps']}",
    ] + (engine.speculation.stats.metrics() if engine.speculation is not None else [])
    return "\n".join(lines) + "\n"
