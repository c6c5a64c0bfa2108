"""Threads per step that adapt to a busy machine (a laptop is never idle).

torch's OpenMP team waits at a barrier at the end of every parallel region, and a decode step has
hundreds of them. When another process holds one of the cores, the thread that shares it is descheduled
for whole scheduler slices and every barrier waits for it: measured here on 2 cores with other work running,
the bundled model decoded at 1.5-2.2 tok/s with two threads and 34-39 tok/s with one; its prefill at 23-47
against 655-2184 tok/s. A fixed thread count is wrong either way (idle, two threads read memory faster).

`Governor` times the steps it runs and keeps, per kind of step ("decode", "prefill"), a moving average of seconds
per unit of work for each candidate thread count (all threads, and one); "speculative" is a draft and verify
round (speculative.py), timed per round. It runs the faster one and re-measures the other now and then, as often
as a 5% time budget allows (a probe of a choice 33x slower is a 32-step loss, so it comes every 640 steps; a
close one every 32), and half as often after each probe that loses in a row (so a steady machine pays well under
1%: with one core busy the budget's 5% showed as a 0.9x decode). A change in the chosen count's own step time
(1.5x its time at the last decision: load arriving) brings the next probe forward at once, so backing off never
delays noticing new load. Before any step has been timed, `probe()` times a small parallel op both ways to pick
the first choice and the first probe's distance (a few ms); the probe times the two counts in turn and picks one
thread only when it is clearly (1.3x) faster. Decode checks one thread right after its warm-up (a step costs
milliseconds); prefill does not (its step is a prompt chunk: seconds), and follows decode when decode switches.

Process-wide (torch's thread count is): the CLI and server enable it (`enable`) unless `--threads` pins a
count; library calls leave it off, and then `run` just calls the step. Decode gives the same bits on any
thread count (the kernels split work into fixed blocks: tested); prefill runs torch ops whose reductions
split by thread, so under a changing load a prompt's logits can differ in the last bits from a pinned run:
pin `--threads` for runs that must repeat bit for bit on a machine whose load varies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

ALPHA = 0.3  # weight of a new timing in the moving average
BUDGET = 0.05  # time a re-measurement of the slower choice may cost, as a fraction of the steps between two
PROBE_EVERY = 32  # the fewest steps between re-measurements (a probe 1.5x slower: 1.6% of the time)
PROBE_MAX = 1024
HYSTERESIS = 1.1  # the other choice must be this much faster to take over
BACKOFF_MAX = 5  # a probe interval doubles per losing probe in a row, up to 32x (and PROBE_MAX)
PROBE_MARGIN = 1.3  # the first probe picks one thread only when it is this much faster than all
CHANGED = 1.5  # the chosen count's moving average this many times its time at the last decision: probe now


def probe_interval(ratio: float) -> int:
    """Steps between re-measurements when the other choice takes `ratio` times as long: a probe then costs
    ratio - 1 steps, kept within BUDGET of the steps between probes (ratio 33, two threads on a contended
    core: every 640 steps)."""
    return int(min(PROBE_MAX, max(PROBE_EVERY, (ratio - 1) / BUDGET)))


class Governor:
    clock = staticmethod(time.perf_counter)  # tests drive it with a fake clock

    def __init__(self, max_threads: int):
        self.max_threads = max(1, int(max_threads))
        self.choices = (self.max_threads, 1) if self.max_threads > 1 else (1,)
        self.est: dict[tuple[str, int], float] = {}  # (kind, threads) -> seconds per unit
        self.warm: set[str] = set()  # the first step of a kind is a warm-up (allocations, kernel builds)
        self.current: dict[str, int] = {}
        self.countdown: dict[str, int] = {}
        self.undecided: set[str] = set()  # probed before the chosen count had a clean timing: judge after it has
        self.lost: dict[str, int] = {}  # probes of the other count lost in a row (the backoff's exponent)
        self.ref: dict[str, float] = {}  # the chosen count's seconds per unit when last decided
        self.switches = 0

    def _other(self, n: int) -> int | None:
        return next((c for c in self.choices if c != n), None)

    def choice(self, kind: str) -> int:
        if kind not in self.current:
            other = next((k for k in self.current if k != kind), None)
            if other is not None:  # start from the other kind's choice; check one thread at once as below
                self.current[kind] = self.current[other]
                self.countdown[kind] = 1 if self._check_at_once(kind) else PROBE_EVERY
            else:
                # The small op misjudges a busy core now and then (measured: it kept two threads with one core
                # busy, whose decode steps then took 24x one thread's). Trying one thread right after the
                # warm-up costs at most ~1.5x one decode step, so that is checked at once; a choice of one
                # thread is trusted for as long as the probe's ratio budgets.
                best, ratio = self.probe()
                self.current[kind] = best
                self.countdown[kind] = 1 if self._check_at_once(kind) else probe_interval(ratio)
        return self.current[kind]

    def _check_at_once(self, kind: str) -> bool:
        """Whether to time one thread right after the warm-up: for decode steps (milliseconds each), when all
        threads were chosen. Not for prefill: its step is a whole chunk of the prompt (seconds), and a probe
        there ran a 512-token prompt on one thread (1.7x slower) in every fresh `generate`."""
        return kind in ("decode", "speculative") and self.current[kind] == self.max_threads

    def run(self, kind: str, fn: Callable[[], T], work: float = 1.0) -> T:
        """Run fn() with the thread count chosen for `kind`, timing it as `work` units."""
        if len(self.choices) == 1:
            return fn()
        n = self.choice(kind)
        probing = self.countdown[kind] <= 0 and kind in self.warm
        use = self._other(n) if probing else n
        before = torch.get_num_threads()
        torch.set_num_threads(use)
        t = self.clock()
        try:
            return fn()
        finally:
            dt = (self.clock() - t) / max(work, 1e-9)
            torch.set_num_threads(before)
            if kind not in self.warm:
                self.warm.add(kind)
            else:
                old = self.est.get((kind, use))
                self.est[(kind, use)] = dt if old is None or probing else (1 - ALPHA) * old + ALPHA * dt
                ref = self.ref.get(kind)
                if not probing and ref is not None and self.est[(kind, use)] > CHANGED * ref:
                    self.countdown[kind] = min(self.countdown[kind], 1)  # the load changed: look again now
                    self.lost[kind] = 0
                    self.ref[kind] = self.est[(kind, use)]
            self.countdown[kind] -= 1
            if probing or kind in self.undecided:
                self.undecided.discard(kind)
                self._decide(kind)

    def _decide(self, kind: str) -> None:
        n = self.current[kind]
        alt = self._other(n)
        a, b = self.est.get((kind, n)), self.est.get((kind, alt))
        if a is None:  # the chosen count has no clean timing yet: judge after its next step
            self.countdown[kind] = PROBE_EVERY
            self.undecided.add(kind)
        elif b * HYSTERESIS < a:
            self.current[kind] = alt
            self.switches += 1
            self.lost[kind] = 0
            self.ref[kind] = b
            self.countdown[kind] = probe_interval(a / b)
            for other in self.current:  # the load changed for every kind: the others follow (their timings
                if other != kind and self.current[other] != alt:  # of the old count predate the change)
                    self.est.pop((other, self.current[other]), None)
                    self.current[other] = alt
                    self.countdown[other] = PROBE_EVERY
                    self.lost[other] = 0
                    self.ref.pop(other, None)
        else:
            lost = self.lost[kind] = self.lost.get(kind, 0) + 1
            self.ref[kind] = a
            self.countdown[kind] = min(PROBE_MAX, probe_interval(b / a) << min(lost - 1, BACKOFF_MAX))

    def probe(self, repeats: int = 7) -> tuple[int, float]:
        """The faster of all threads and one on a small parallel op (median of `repeats`), and how many
        times as long the other took. The counts are timed in turn, not one after the other: a core waking
        from idle runs its first milliseconds slowly, which timed all-threads first made one thread look
        faster in 2 of 5 probes on an idle 2-core machine (the first prefill then ran on one thread, 1.7x
        slower); interleaved, 5 of 5 chose two threads (1.7-1.9x faster)."""
        if len(self.choices) == 1:
            return 1, 1.0
        x = torch.rand(1 << 20)
        y = torch.empty_like(x)  # no allocation inside the timings
        before = torch.get_num_threads()
        times: dict[int, list[float]] = {n: [] for n in self.choices}
        try:
            for n in self.choices:  # warm each count's team
                torch.set_num_threads(n)
                torch.exp(x, out=y)
            for _ in range(repeats):
                for n in self.choices:
                    torch.set_num_threads(n)
                    t = self.clock()
                    torch.exp(x, out=y)
                    times[n].append(self.clock() - t)
        finally:
            torch.set_num_threads(before)
        med = {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}
        # one thread only when clearly faster: a busy core makes all threads many times slower (24x measured),
        # while an idle machine's noise put all threads at 1.1x one thread in 1 of ~10 probes
        best = 1 if med[1] * PROBE_MARGIN < med[self.max_threads] else self.max_threads
        return best, max(med.values()) / max(med[best], 1e-9)

    def summary(self) -> dict:
        return {"threads": dict(self.current), "switches": self.switches,
                "seconds_per_unit": {f"{k}@{n}": round(v, 6) for (k, n), v in self.est.items()}}


_governor: Governor | None = None


def enable(max_threads: int | None = None) -> Governor:
    """Adapt threads per step from now on (max_threads: None = torch's current count)."""
    global _governor
    _governor = Governor(max_threads or torch.get_num_threads())
    return _governor


def disable() -> None:
    global _governor
    _governor = None


def governor() -> Governor | None:
    return _governor


def run(kind: str, fn: Callable[[], T], work: float = 1.0) -> T:
    """fn() under the governor when one is enabled, else as it is."""
    return fn() if _governor is None else _governor.run(kind, fn, work)
