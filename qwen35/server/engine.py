"""The serving engine: one worker thread that batches every active request into each decode step.

Requests wait in a bounded queue (full -> QueueFull, the HTTP layer answers 429). Between steps the worker
admits waiting requests in order while the batch has room and their memory fits the budget (below), feeds
their prompts a chunk per turn of the loop, interleaved with the batch's decode steps (prefill.py says the
policy; each restores the longest snapshotted prefix from the prompt cache first), then merges each
prefilled row into the batch (its rows are moved in, no other row's KV is touched) and drops finished,
cancelled or timed-out ones (`HybridCache.filter`). A cancelled request stops within one prefill chunk.

Memory: each request reserves its KV for prompt + max_tokens and its constant Gated DeltaNet state
(memory.sequence_bytes) when admitted, and gives it back when it ends. With a `memory_budget`, a request
that could never fit is refused at submit (MemoryBudgetExceeded, the HTTP layer answers 400 with the
numbers), and one that does not fit beside the running ones waits in the queue until they finish. The
prompt cache has its own cap (`prompt_cache_bytes`) on top of the budget. Decoding is generation.step, the loop every generator
uses, or with a `Speculation` speculative.step (the MTP head's KV rows ride along with the main cache's;
rows accept different numbers of drafts; snapshots for prompt reuse are taken only at prompt ends and
answer ends, which are accepted positions). Each request reads its results (generation.Response) from its
own queue; a failure in one request is delivered to that request only.

Every request gets a last item on its queue: a finish, an error, "timeout" (`timeout_s` passed, queued or
running) or "shutdown": `drain` refuses new requests (ShuttingDown), ends the waiting ones and gives the running
ones a grace period; whatever is left when `run()` returns, for any reason, ends "shutdown".
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from .. import speculative
from ..cache import HybridCache
from ..generation import Response, Stream, check_context, step
from ..memory import format_bytes, sequence_bytes
from ..prompt_cache import PromptCache
from .prefill import DRAFT_SLACK, PromptFeed
from .request import MemoryBudgetExceeded, QueueFull, Request, ShuttingDown, Token  # (re-exported)


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prompt_cache_bytes: int = 2 * 2**30,
                 prefill_chunk_size: int = 512, thread: bool = True,
                 speculation: speculative.Speculation | None = None, memory_budget: int | None = None):
        """speculation: draft with the MTP head (qwen35 serve --speculative). memory_budget: bytes of KV +
        state the requests in flight may reserve together (None: no limit). thread=False: no worker
        thread; the caller runs `run()` itself (qwen35 serve runs it on the main thread: torch's OpenMP
        work is ~12% slower from a second thread once the main thread has its own OpenMP team, measured
        on prefill)."""
        if max_batch < 1 or prefill_chunk_size < 1:  # either would hang every request
            raise ValueError(f"max_batch and prefill_chunk_size must be >= 1, got {max_batch}, {prefill_chunk_size}")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk_size = prefill_chunk_size
        self.memory_budget, self.reserved_bytes = memory_budget, 0
        self.prompt_cache = PromptCache(model, prompt_cache_bytes)
        self.waiting: deque[Request] = deque()  # guarded by _lock (submit runs on HTTP threads)
        self.feeding: list[PromptFeed] = []  # admitted requests whose prompts are being prefilled
        self._next_feed = 0  # round robin over `feeding`
        self.active: list[tuple[Request, Stream]] = []  # row b of self.cache belongs to active[b]
        self.cache: HybridCache | None = None
        self.speculation = speculation
        if speculation is not None:
            speculation.head(model)  # no MTP head: refuse at start, not at the first request
        self.mcache: HybridCache | None = None  # the MTP head's KV, row b for active[b] (with speculation)
        self.drafting: list[speculative.DraftRow] = []  # row b's drafting state (with speculation)
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "errors": 0,
                      "ttft_sum": 0.0, "ttft_count": 0, "decode_steps": 0, "decode_tokens": 0, "decode_time": 0.0}
        self._wake = threading.Event()
        self._stop = False
        self._drain_by: float | None = None  # monotonic time by which running requests must have ended
        self._lock = threading.Lock()
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self.run, name="qwen35-engine", daemon=True)
            self.thread.start()

    # ---- API for the HTTP layer ----
    def submit(self, req: Request) -> Request:
        check_context(self.model, 0, len(req.prompt), req.params.max_tokens)
        req.reserved_bytes = self.request_bytes(len(req.prompt), req.params.max_tokens)
        if self.memory_budget is not None and req.reserved_bytes > self.memory_budget:
            raise MemoryBudgetExceeded(
                f"this request needs {format_bytes(req.reserved_bytes)} of KV and state (prompt of "
                f"{len(req.prompt)} tokens + max_tokens {req.params.max_tokens}) but the server's memory budget "
                f"is {format_bytes(self.memory_budget)}; lower max_tokens or shorten the prompt")
        with self._lock:
            if self.draining:  # (under the lock, which the drain's sweeps take too: no request slips past them)
                raise ShuttingDown("the server is shutting down and takes no new requests")
            self._drop_ended()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(req)
            self.stats["requests"] += 1
        self._wake.set()
        return req

    def request_bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """What a request reserves against the memory budget: its row's KV for prompt + max_tokens and
        its Gated DeltaNet state (plus the MTP head's KV when drafting)."""
        if self.speculation is None:
            return sequence_bytes(self.model.cache_layout(), prompt_tokens + max_tokens)
        n = prompt_tokens + max_tokens + DRAFT_SLACK
        return sequence_bytes(self.model.cache_layout(), n) + sequence_bytes(self.model.cache_layout(mtp=True), n)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            self._drop_ended()
            return len(self.waiting)

    def _drop_ended(self) -> None:
        """Take requests whose clients left, or whose timeout passed, out of the queue (under _lock): they would
        hold its places (and their clients) until the batch had room for them (the worker may be busy for minutes)."""
        now = time.monotonic()
        ended = [(r, self._ended(r, now)) for r in self.waiting]
        if any(why for _, why in ended):
            self.waiting = deque(r for r, why in ended if why is None)
            for r, why in ended:
                if why is not None:
                    r.out.put(Token(None, finish_reason=why))

    def stop(self) -> None:
        """Ask `run()` to return (safe from any thread or a signal handler); what is left ends "shutdown"."""
        self._stop = True
        self._wake.set()

    def drain(self, grace_s: float) -> None:
        """Refuse new requests, end the waiting ones, give the running ones `grace_s` seconds, then `run()`
        returns. A second call only shortens the grace. Sets a number only (no lock): a signal handler may call it."""
        by = time.monotonic() + grace_s
        self._drain_by = by if self._drain_by is None else min(self._drain_by, by)

    @property
    def draining(self) -> bool:
        return self._drain_by is not None

    def shutdown(self) -> None:
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # ---- worker ----
    def run(self) -> None:
        """The worker loop, until stop() or the end of a drain: admit, one decode step for the batch, one
        prefill chunk."""
        torch.set_grad_enabled(False)
        try:
            while not self._stop:
                if self._drain_by is not None:
                    self._end(running=False)
                    if time.monotonic() >= self._drain_by or not (self.active or self.feeding):
                        break
                if not self.active and not self.feeding and not self.waiting:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                with torch.inference_mode():
                    self._turn_once()
        finally:
            self._end(running=True)

    def _end(self, running: bool) -> None:
        """End the waiting requests "shutdown"; with `running`, the prefilling and running ones too."""
        with self._lock:
            ended, self.waiting = list(self.waiting), deque()
        if running:
            ended += [job.req for job in self.feeding] + [req for req, _ in self.active]
            for job in self.feeding:
                self._release(job.req)
            self.feeding = []
            self._keep([])  # (releases the running ones' memory)
        for r in ended:
            r.out.put(Token(None, finish_reason="shutdown"))

    def _turn_once(self) -> None:
        """One turn of the loop: admit what fits, one decode step for the batch, one prefill chunk."""
        self._admit()
        if self.active:
            self._step()
        if self.feeding:
            self._prefill_turn()

    def _admit(self) -> None:
        """Start waiting requests, oldest first, while the batch has room and the oldest one's memory fits
        (a later, smaller request does not overtake it: it would starve a big one)."""
        with self._lock:
            self._drop_ended()
        while len(self.active) + len(self.feeding) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    return
                req = self.waiting[0]
                if not req.cancelled.is_set() and self.memory_budget is not None and \
                        self.reserved_bytes + req.reserved_bytes > self.memory_budget:
                    return  # waits for running requests to give memory back
                self.waiting.popleft()
            if req.cancelled.is_set():
                req.out.put(Token(None, finish_reason="cancelled"))
                continue
            self.reserved_bytes += req.reserved_bytes
            try:
                self.feeding.append(PromptFeed(self.model, req, self.prompt_cache, self.prefill_chunk_size,
                                               self.speculation))
                req.cached_tokens = self.feeding[-1].cached
                req.drops_answers = self.prompt_cache.drops_answers(self.feeding[-1].key)
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                self._release(req)
                self._fail(req, e)

    def _prefill_turn(self) -> None:
        """One chunk of one prompt (the prompts in turn); a prompt fed to its end joins the batch."""
        self._next_feed %= len(self.feeding)
        job = self.feeding[self._next_feed]
        req = job.req
        ended = self._ended(req, time.monotonic())
        if ended is not None:
            self.feeding.pop(self._next_feed)
            self._release(req)
            req.out.put(Token(None, finish_reason=ended))
            return
        try:
            if not job.done:  # (a prompt restored whole from the prompt cache has nothing to feed)
                job.feed()
        except Exception as e:  # noqa: BLE001
            self.feeding.pop(self._next_feed)
            self._release(req)
            self._fail(req, e)
            return
        if not job.done:
            self._next_feed += 1
            return
        self.feeding.pop(self._next_feed)
        try:
            self._join(job)
        except Exception as e:  # noqa: BLE001
            self._release(req)
            self._fail(req, e)

    def _join(self, job: PromptFeed) -> None:
        """A prompt fed to its end: sample its first token, then move its row into the batch."""
        req = job.req
        self.stats["prompt_tokens"] += len(req.prompt)
        self.stats["cached_tokens"] += job.cached
        stream = Stream.start(self.model, req.prompt, req.params, guide=req.guide)
        first = stream.sample(job.logits)
        self._deliver(req, first)
        if stream.finish is not None:
            self._release(req)
            return
        self.cache = job.cache if self.cache is None else HybridCache.merge([self.cache, job.cache])
        self.active.append((req, stream))
        if self.speculation is not None:
            row = self.speculation.new_row(req.params)
            speculative.start(row, first, job.last_hidden)
            self.mcache = job.mcache if self.mcache is None else HybridCache.merge([self.mcache, job.mcache])
            self.drafting.append(row)

    def _release(self, req: Request) -> None:
        """Give a request's reserved memory back (it ended, failed or was cancelled)."""
        self.reserved_bytes -= req.reserved_bytes
        req.reserved_bytes = 0

    @staticmethod
    def _ended(req: Request, now: float) -> str | None:
        if req.cancelled.is_set():
            return "cancelled"
        if req.timeout_s is not None and now - req.created > req.timeout_s:
            return "timeout"
        return None

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
            ended = self._ended(req, now)
            if ended is None:
                keep.append(i)
            else:
                req.out.put(Token(None, finish_reason=ended))
        self._keep(keep)
        if not self.active:
            return
        t0 = time.perf_counter()
        produced = self._decode()
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += sum(r.token is not None for rs in produced for r in rs)  # (drafts accepted)
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
            self._release(req)
            self._deliver(req, rs[0])
        return [out[i] for i in keep]

    def _remember_answer(self, i: int) -> None:
        """Snapshot a finished row at the end of its answer (prompt + every generated token but the last,
        which was sampled and never fed), so the next turn of the conversation reuses the answer too."""
        req = self.active[i][0]
        key = req.key or req.prompt
        tokens = key + req.generated[:-1]
        if self.prompt_cache.max_bytes <= 0 or self.cache.lengths[i] != len(tokens):
            return
        snap = self.cache.snapshot(rows=[i])
        # the row leaves the batch next: the room it reserved for max_tokens and did not use would stay
        # alive in its snapshots for as long as they are cached
        self.cache.trim([i])
        # what it restored from, its turn boundary and its prompt's end hold less of this conversation than
        # the answer does: evicted first (another conversation that they also start hits them again); not the
        # shared system turn's, which belongs to every conversation that opens with it. Unless this client's
        # prompts do not repeat the answers given to it (reasoning dropped): its next turn restores the turn
        # boundary (its answer is prefilled again), so that stays, and the answer goes first.
        boundary = req.boundary if 0 < req.boundary < len(key) else len(key)
        earlier = [key[:n] for n in (req.cached_tokens, boundary) if 0 < n < len(key) and n != req.prefix]
        if req.drops_answers:
            earlier = [k for k in earlier if len(k) != boundary]
        self.prompt_cache.store_snapshot(tokens, snap, demote=earlier + [key], answer_of=boundary,
                                         demoted=req.drops_answers)

    def _fail(self, req: Request, e: Exception) -> None:
        self.stats["errors"] += 1
        req.out.put(Token(None, error=f"{type(e).__name__}: {e}"))

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.active):
            return
        kept = set(keep)
        for i, (req, _) in enumerate(self.active):
            if i not in kept:
                self._release(req)
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
