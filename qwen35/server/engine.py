"""The serving engine: one worker thread that batches every active request into each decode step.

Requests wait in a bounded queue (full -> QueueFull, the HTTP layer answers 429). Between steps the worker
admits waiting requests (prefilled alone, restoring the longest snapshotted prefix from the prompt cache,
then merged into the batch) and drops finished, cancelled or timed-out ones. Each request reads its
results from its own queue; a failure in one request is delivered to that request only.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..generate import check_context, prefill
from ..prompt_cache import PromptCache
from ..sampling import Sampler, SamplingParams, step_logprobs
from . import batch as batching


class QueueFull(Exception):
    pass


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    boundary: int = 0  # a turn boundary inside the prompt worth a snapshot (0 = none)
    timeout_s: float | None = None
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Token:
    """One generated token (or the end, or an error) for a request's consumer."""

    token: int | None
    logprob: float | None = None
    top_logprobs: tuple | None = None
    finish_reason: str | None = None
    error: str | None = None


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prompt_cache_bytes: int = 2 * 2**30,
                 prefill_chunk_size: int = 512, thread: bool = True):
        """thread=False: no worker thread; the caller runs `run()` itself (qwen35 serve runs it on the main
        thread: torch's OpenMP work is ~12% slower from a second thread once the main thread has its own
        OpenMP team, measured on prefill)."""
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk_size = prefill_chunk_size
        self.prompt_cache = PromptCache(model, prompt_cache_bytes)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[tuple[Request, Sampler, int]] = []  # (request, sampler, last token)
        self.cache = None
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "ttft_sum": 0.0, "ttft_count": 0, "decode_steps": 0, "decode_time": 0.0, "errors": 0}
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self.run, name="qwen35-engine", daemon=True)
            self.thread.start()

    # ---- API for the HTTP layer ----
    def submit(self, req: Request) -> Request:
        check_context(self.model, 0, len(req.prompt), req.params.max_tokens)
        with self._lock:
            if self.waiting.qsize() >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.put(req)
            self.stats["requests"] += 1
        self._wake.set()
        return req

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    def stop(self) -> None:
        """Ask `run()` to return (safe from any thread or a signal handler)."""
        self._stop = True
        self._wake.set()

    def shutdown(self) -> None:
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # ---- worker ----
    def run(self) -> None:
        """The worker loop, until stop()."""
        torch.set_grad_enabled(False)
        while not self._stop:
            if not self.active and self.waiting.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            with torch.inference_mode():
                self._admit()
                if self.active:
                    self._step()

    def _admit(self) -> None:
        while len(self.active) < self.max_batch and not self.waiting.empty():
            req = self.waiting.get()
            if req.cancelled.is_set():
                req.out.put(Token(None, finish_reason="cancelled"))
                continue
            try:
                self._start(req)
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                self._fail(req, e)

    def _start(self, req: Request) -> None:
        model = self.model
        cache, cached = self.prompt_cache.lookup(req.prompt)
        if req.boundary and cached < req.boundary < len(req.prompt):
            prefill(model, torch.tensor([req.prompt[cached:req.boundary]]), cache, self.prefill_chunk_size)
            self.prompt_cache.store(req.prompt[: req.boundary], cache)
        logits = prefill(model, torch.tensor([req.prompt[cache.offset:]]), cache, self.prefill_chunk_size)
        self.prompt_cache.store(req.prompt, cache)
        req.cached_tokens = cached
        self.stats["prompt_tokens"] += len(req.prompt)
        self.stats["cached_tokens"] += cached
        sampler = Sampler(req.params, model.config.vocab_size, 1, [req.prompt])
        tok = self._emit(req, sampler, logits, 0)
        if tok is None:
            return
        self.cache = batching.merge(self.cache, cache)
        self.active.append((req, sampler, tok))

    def _emit(self, req: Request, sampler: Sampler, logits: torch.Tensor, index: int) -> int | None:
        """Sample, deliver, and return the token if the request goes on (None when it finished)."""
        tok = sampler(logits)
        sampler.observe(tok)
        t = int(tok[0])
        p = req.params
        finish = "stop" if t in p.stop_token_ids else ("length" if index + 1 >= p.max_tokens else None)
        lp, top = step_logprobs(logits, tok, p)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.stats["ttft_sum"] += req.first_token_at - req.created
            self.stats["ttft_count"] += 1
        self.stats["generated_tokens"] += 1
        req.generated.append(t)
        req.out.put(Token(t, lp, top, finish))
        return None if finish else t

    def _step(self) -> None:
        now = time.monotonic()
        keep = []
        for i, (req, _, _) in enumerate(self.active):
            if req.cancelled.is_set():
                req.out.put(Token(None, finish_reason="cancelled"))
            elif req.timeout_s is not None and now - req.created > req.timeout_s:
                req.out.put(Token(None, finish_reason="timeout"))
            else:
                keep.append(i)
        self._keep(keep)
        if not self.active:
            return
        t0 = time.perf_counter()
        logits = self._forward()
        if logits is None:
            return
        self.stats["decode_steps"] += 1
        self.stats["decode_time"] += time.perf_counter() - t0
        keep, finished = [], []
        for i, (req, sampler, _) in enumerate(self.active):
            try:
                tok = self._emit(req, sampler, logits[i : i + 1], len(req.generated))
            except Exception as e:  # noqa: BLE001 - a sampling failure ends this request only
                self._fail(req, e)
                continue
            if tok is not None:
                self.active[i] = (req, sampler, tok)
                keep.append(i)
            else:
                finished.append(i)
        for i in finished:
            self._remember_answer(i)
        self._keep(keep)

    def _forward(self) -> torch.Tensor | None:
        """Logits [B, V] for the batch's last tokens. If the batched forward fails, the cache goes back to
        where it was and each row runs alone: rows that fail alone get the error, the others go on."""
        tokens = torch.tensor([[tok] for _, _, tok in self.active])
        before = self.cache.snapshot()
        try:
            return self.model(tokens, cache=self.cache)[:, -1]
        except Exception:  # noqa: BLE001 - find the request(s) at fault, keep serving the rest
            self.cache.restore(before)
        rows, logits, keep = [], [], []
        for i, (req, _, tok) in enumerate(self.active):
            row = self._row(i)
            try:
                logits.append(self.model(torch.tensor([[tok]]), cache=row)[:, -1])
            except Exception as e:  # noqa: BLE001
                self._fail(req, e)
                continue
            rows.append(row)
            keep.append(i)
        self.active = [self.active[i] for i in keep]
        self.cache = None
        for row in rows:
            self.cache = batching.merge(self.cache, row)
        return torch.cat(logits) if logits else None

    def _row(self, i: int):
        """Row i of the batch as a batch-1 cache without padding (a copy: the batch is untouched)."""
        row = batching.remove(self.cache, [i])
        row.pad = None
        return row

    def _remember_answer(self, i: int) -> None:
        """Snapshot a finished row at the end of its answer (prompt + every generated token but the last,
        which was sampled and never fed), so the next turn of the conversation reuses the answer too."""
        req = self.active[i][0]
        tokens = req.prompt + req.generated[:-1]
        if self.prompt_cache.max_bytes <= 0 or self.cache.offset - int(self.cache.pad[i]) != len(tokens):
            return
        self.prompt_cache.store(tokens, self._row(i))

    def _fail(self, req: Request, e: Exception) -> None:
        self.stats["errors"] += 1
        req.out.put(Token(None, error=f"{type(e).__name__}: {e}"))

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        self.cache = batching.remove(self.cache, keep) if self.cache is not None else None
