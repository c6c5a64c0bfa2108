"""/metrics: the engine's counters and gauges in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations


def prometheus_text(engine) -> str:
    """Requests, tokens (prompt, reused from the prompt cache, generated), queue and batch sizes, reserved
    memory against the budget, time to first token, decode speed, and speculative decoding's counts."""
    s = engine.stats
    lines = [
        "# TYPE qwen35_requests_total counter", f"qwen35_requests_total {s['requests']}",
        "# TYPE qwen35_request_errors_total counter", f"qwen35_request_errors_total {s['errors']}",
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
        f"qwen35_decode_tokens_per_second {s['decode_steps'] / s['decode_time'] if s['decode_time'] else 0:.3f}",
    ] + (engine.speculation.stats.metrics() if engine.speculation is not None else [])
    return "\n".join(lines) + "\n"
