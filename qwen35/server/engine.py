"""The serving engine: one worker thread that batches every active request into each decode step.

Requests wait in a bounded queue (full -> QueueFull, the HTTP layer answers 429). Between steps the worker
admits waiting requests (prefilled alone, restoring the longest snapshotted prefix from the prompt cache,
then merged into the batch: its rows are moved in, no other row's KV is touched) and drops finished,
cancelled or timed-out ones (`HybridCache.filter`). Decoding is generation.step, the loop every generator
uses, or with a `Speculation` speculative.step (the MTP head's KV rows ride along with the main cache's;
rows accept different numbers of drafts; snapshots for prompt reuse are taken only at prompt ends and
answer ends, which are accepted positions). Each request reads its results (generation.Response) from its
own queue; a failure in one request is delivered to that request only.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import speculative
from ..cache import HybridCache
from ..generation import Response, Stream, check_context, prefill, step
from ..prompt_cache import PromptCache
from ..sampling import SamplingParams


class QueueFull(Exception):
    pass


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    boundary: int = 0  # a turn boundary inside the prompt worth a snapshot (0 = none)
    timeout_s: float | None = None
    guide: Any = None  # guide.GuideSpec of a constrained request: each row starts its own state from it
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


Token = Response  # what a request's queue carries: a generated token, or an end without one (token None)


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prompt_cache_bytes: int = 2 * 2**30,
                 prefill_chunk_size: int = 512, thread: bool = True,
                 speculation: speculative.Speculation | None = None):
        """speculation: draft with the MTP head (qwen35 serve --speculative). thread=False: no worker thread; the caller runs `run()` itself (qwen35 serve runs it on the main
        thread: torch's OpenMP work is ~12% slower from a second thread once the main thread has its own
        OpenMP team, measured on prefill)."""
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk_size = prefill_chunk_size
        self.prompt_cache = PromptCache(model, prompt_cache_bytes)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[tuple[Request, Stream]] = []  # row b of self.cache belongs to active[b]
        self.cache: HybridCache | None = None
        self.speculation = speculation
        if speculation is not None:
            speculation.head(model)  # no MTP head: refuse at start, not at the first request
        self.mcache: HybridCache | None = None  # the MTP head's KV, row b for active[b] (with speculation)
        self.drafting: list[speculative.DraftRow] = []  # row b's drafting state (with speculation)
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
        spec = self.speculation
        mcache = model.make_mtp_cache(batch_size=1) if spec is not None else None

        def feed(ids: list[int]):
            if spec is None:
                return prefill(model, torch.tensor([ids]), cache, self.prefill_chunk_size), None
            return speculative.prefill(model, ids, cache, mcache, self.prefill_chunk_size)

        if req.boundary and cached < req.boundary < len(req.prompt):
            feed(req.prompt[cached:req.boundary])
            self.prompt_cache.store(req.prompt[: req.boundary], cache)
        logits, last_h = feed(req.prompt[cache.offset:])
        self.prompt_cache.store(req.prompt, cache)
        req.cached_tokens = cached
        self.stats["prompt_tokens"] += len(req.prompt)
        self.stats["cached_tokens"] += cached
        stream = Stream.start(model, req.prompt, req.params, guide=req.guide)
        first = stream.sample(logits)
        self._deliver(req, first)
        if stream.finish is None:
            self.cache = cache if self.cache is None else HybridCache.merge([self.cache, cache])
            self.active.append((req, stream))
            if spec is not None:
                row = spec.new_row(req.params)
                speculative.start(row, first, last_h)
                self.mcache = mcache if self.mcache is None else HybridCache.merge([self.mcache, mcache])
                self.drafting.append(row)

    def _deliver(self, req: Request, r: Response) -> None:
        if r.error is not None:
            self.stats["errors"] += 1
            req.out.put(r)
            return
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.stats["ttft_sum"] += req.first_token_at - req.created
            self.stats["ttft_count"] += 1
        self.stats["generated_tokens"] += 1
        req.generated.append(r.token)
        req.out.put(r)

    def _step(self) -> None:
        now = time.monotonic()
        keep = []
        for i, (req, _) in enumerate(self.active):
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
        produced = self._decode()
        self.stats["decode_steps"] += 1
        self.stats["decode_time"] += time.perf_counter() - t0
        keep = []
        for i, ((req, stream), rs) in enumerate(zip(self.active, produced)):
            for r in rs:
                self._deliver(req, r)
            if stream.finish is None:
                keep.append(i)
            elif stream.finish != "error":
                self._remember_answer(i)
        self._keep(keep)

    def _decode(self) -> list[list[Response]]:
        """One generation.step for the whole batch (a row whose sampling fails gets an error Response). If
        the forward fails, the cache goes back to where it was and each row steps alone: a row that fails
        alone gets the error, the others go on."""
        streams = [s for _, s in self.active]
        before = self.cache.snapshot()
        try:
            if self.speculation is not None:
                return speculative.step(self.model, self.cache, self.mcache, streams, self.drafting,
                                        self.speculation, isolate=True)
            return step(self.model, self.cache, streams, isolate=True)
        except Exception as e:  # noqa: BLE001 - find the request(s) at fault, keep serving the rest
            self.cache.restore(before)
            for row in self.drafting:  # these rows go on without drafting (their MTP state is not trusted)
                row.turn_off(f"a speculative round failed ({type(e).__name__})", self.speculation.stats, "error")
        out, rows = [], []
        for i, stream in enumerate(streams):
            row = self.model.make_cache(batch_size=1)
            row.restore(self.cache.snapshot(rows=[i]))
            try:
                out.append(step(self.model, row, [stream], isolate=True)[0])
                rows.append(row)
            except Exception as e:  # noqa: BLE001
                stream.finish = "error"
                out.append([Response(None, error=f"{type(e).__name__}: {e}")])
                rows.append(None)
        # rows that failed alone leave the batch; the others are merged back (moved, not copied)
        keep = [i for i, r in enumerate(rows) if r is not None]
        self.cache = HybridCache.merge([rows[i] for i in keep]) if keep else None
        if self.speculation is not None:
            self._keep_drafting(keep)
        failed = [(self.active[i], out[i]) for i in range(len(rows)) if rows[i] is None]
        self.active = [self.active[i] for i in keep]
        for (req, _), rs in failed:
            self._deliver(req, rs[0])
        return [out[i] for i in keep]

    def _remember_answer(self, i: int) -> None:
        """Snapshot a finished row at the end of its answer (prompt + every generated token but the last,
        which was sampled and never fed), so the next turn of the conversation reuses the answer too."""
        req = self.active[i][0]
        tokens = req.prompt + req.generated[:-1]
        if self.prompt_cache.max_bytes <= 0 or self.cache.lengths[i] != len(tokens):
            return
        self.prompt_cache.store_snapshot(tokens, self.cache.snapshot(rows=[i]))

    def _fail(self, req: Request, e: Exception) -> None:
        self.stats["errors"] += 1
        req.out.put(Token(None, error=f"{type(e).__name__}: {e}"))

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        if not self.active:
            self.cache = None
        else:
            self.cache.filter(keep)
        if self.speculation is not None:
            self._keep_drafting(keep)

    def _keep_drafting(self, keep: list[int]) -> None:
        self.drafting = [self.drafting[i] for i in keep]
        if not keep:
            self.mcache = None
        elif self.mcache is not None:
            self.mcache.filter(keep)
