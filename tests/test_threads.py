"""The thread governor (qwen35/threads.py): driven by a fake clock whose steps cost what the thread count
makes them cost, so every decision is deterministic; and decode's bits do not depend on the thread count."""

import pytest
import torch

import qwen35
from qwen35 import threads
from qwen35.threads import Governor, probe_interval


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(cost: dict[int, float], start: int = 2, ratio: float = 1.5, max_threads: int = 2):
    """A governor on a fake clock; a step costs cost[torch.get_num_threads()] seconds."""
    clock = FakeClock()
    g = Governor(max_threads)
    g.clock = clock
    g.probe = lambda repeats=7: (start, ratio)

    def step():
        clock.t += cost[torch.get_num_threads()]

    return g, step


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    threads.disable()


def test_switches_to_one_thread_when_two_are_slower_and_probes_within_budget():
    g, step = make({2: 0.99, 1: 0.03}, start=2, ratio=1.2)
    used = []
    for _ in range(400):
        g.run("decode", lambda: (used.append(torch.get_num_threads()), step()))
    assert g.current["decode"] == 1 and g.switches == 1
    # after the switch, two threads are re-measured once per probe_interval(0.99 / 0.03) = 640 steps at most
    after = used[used.index(1):]
    assert after.count(2) <= 1
    assert probe_interval(0.99 / 0.03) == 640


def test_keeps_all_threads_when_they_are_faster_and_probes_cost_under_budget():
    g, step = make({2: 0.010, 1: 0.015}, start=2, ratio=1.5)
    used = []
    for _ in range(1000):
        g.run("decode", lambda: (used.append(torch.get_num_threads()), step()))
    assert g.current["decode"] == 2 and g.switches == 0
    extra = used.count(1) * (0.015 - 0.010)
    assert extra / (len(used) * 0.010) <= threads.BUDGET + 1e-9
    assert used.count(1) >= 1000 // threads.PROBE_MAX  # it keeps looking


def test_follows_load_that_comes_and_goes():
    cost = {2: 0.010, 1: 0.015}
    g, step = make(cost, start=2)
    for _ in range(100):
        g.run("decode", step)
    assert g.current["decode"] == 2
    cost[2] = 0.5  # another program takes a core
    for _ in range(200):
        g.run("decode", step)
    assert g.current["decode"] == 1
    cost[2] = 0.010  # and leaves
    for _ in range(2000):
        g.run("decode", step)
    assert g.current["decode"] == 2 and g.switches == 2


def test_first_step_is_warm_up_and_kinds_share_the_first_choice():
    g, step = make({2: 1.0, 1: 0.03}, start=1, ratio=30)
    g.run("decode", step)
    assert g.est == {}  # the warm-up step is not kept
    g.run("decode", step)
    assert g.est == {("decode", 1): pytest.approx(0.03)}
    assert g.choice("prefill") == 1  # prefill starts from decode's choice, not a new probe


def test_work_units_and_thread_count_restored():
    g, step = make({2: 1.0, 1: 2.0}, start=2)
    torch.set_num_threads(2)
    for _ in range(3):
        g.run("prefill", step, work=100)
    assert g.est[("prefill", 2)] == pytest.approx(0.01)
    assert torch.get_num_threads() == 2


def test_exception_in_step_restores_threads_and_propagates():
    g, _ = make({2: 1.0, 1: 1.0}, start=1)
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="boom"):
        g.run("decode", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert torch.get_num_threads() == 2


def test_single_thread_and_disabled_run_the_step_as_is():
    g = Governor(1)
    assert g.run("decode", lambda: 7) == 7 and g.current == {}
    threads.disable()
    assert threads.run("decode", lambda: 8) == 8


def test_real_probe_returns_a_choice():
    best, ratio = Governor(2).probe(repeats=3)
    assert best in (1, 2) and ratio >= 1.0


def governed_bundled(max_tokens: int):
    """The bundled model as users run it (bf16, kernels), its greedy tokens on two pinned threads, and then a
    two-thread governor enabled whose first probe picks two threads: (model, prompt, params, pinned, governor)."""
    from qwen35.ops import kernels

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    model = qwen35.load_model(qwen35.__path__[0] + "/assets/model", dtype=torch.bfloat16, kernels=True)
    prompt = list(range(10, 40))
    params = qwen35.SamplingParams(temperature=0, max_tokens=max_tokens)
    torch.set_num_threads(2)
    pinned = [r.token for r in qwen35.generate_step(model, prompt, params=params)]
    g = threads.enable(2)
    g.probe = lambda repeats=7: (2, 1.0)
    return model, prompt, params, pinned, g


def test_generation_under_the_governor_gives_the_pinned_tokens(monkeypatch):
    """Decode kernels split work into fixed blocks, so switching threads between steps changes no bit: the
    governed run (prefill on two threads, decode switching between one and two) equals a pinned two-thread run."""
    model, prompt, params, pinned, g = governed_bundled(max_tokens=40)
    monkeypatch.setattr(threads, "PROBE_EVERY", 2)  # probe (and maybe switch) every few steps
    used = []
    run = g.run

    def spy(kind, fn, work=1.0):
        return run(kind, lambda: (used.append(torch.get_num_threads()), fn())[1], work)

    g.run = spy
    adaptive = [r.token for r in qwen35.generate_step(model, prompt, params=params)]
    assert adaptive == pinned
    assert set(used) == {1, 2}  # both counts really ran


def test_losing_probes_back_off_to_well_under_the_budget():
    # one core busy: two threads take 5x one thread's time (the bundled model's decode, measured)
    g, step = make({2: 0.05, 1: 0.01}, start=1, ratio=5)
    used = []
    for _ in range(5000):
        g.run("decode", lambda: (used.append(torch.get_num_threads()), step()))
    assert g.current["decode"] == 1 and g.switches == 0
    extra = used.count(2) * (0.05 - 0.01)
    assert extra / (len(used) * 0.01) < 0.01  # without the backoff: 5% (one probe per 80 steps)
    assert used[-(threads.PROBE_MAX + 1):].count(2) >= 1  # it still looks


def test_load_arriving_after_a_long_backoff_is_noticed_at_once():
    cost = {2: 0.010, 1: 0.015}
    g, step = make(cost, start=2, ratio=1.5)
    for _ in range(3000):  # many losing probes of one thread: the next one is ~1000 steps away
        g.run("decode", step)
    assert g.lost["decode"] >= 4  # probes now 32 x 2**4 = 512 or more steps apart
    cost[2] = 0.5  # another program takes a core
    n = 0
    while g.current["decode"] == 2:
        g.run("decode", step)
        n += 1
    assert n <= 4  # the moving average crosses 1.5x after one step; the probe of one thread follows


def test_an_idle_probe_keeps_prefill_on_all_threads_and_decode_load_reaches_it():
    """Prefill's step is a whole prompt chunk: after a probe that picked all threads it is not re-timed on one
    thread at once (that ran a fresh `generate`'s prompt 1.7x slower). Decode, whose steps are cheap, checks
    one thread at once; when it switches (load arrived), prefill follows from its next chunk."""
    g, step = make({2: 0.03, 1: 0.05}, start=2, ratio=1.7)
    used = []

    def timed(n):
        def s():
            used.append(torch.get_num_threads())
            step()
        return s

    for _ in range(3):  # warm-up + two real prefill chunks: all on two threads
        g.run("prefill", timed(2), work=512)
    assert used == [2, 2, 2]
    # load arrives: two threads now cost 30x one
    g2, busy = make({2: 1.0, 1: 0.05}, start=2, ratio=1.7)
    g.clock, step = g2.clock, busy
    for _ in range(4):
        g.run("decode", step)
    assert g.current["decode"] == 1 and g.switches == 1
    used.clear()
    g.run("prefill", timed(1), work=512)
    assert used == [1]  # the next chunk follows decode to one thread
    assert g.current["prefill"] == 1


def test_speculative_rounds_run_under_the_governor(monkeypatch):
    """Drafting rounds and the MTP prefill go through the governor as plain decode steps do: run on two threads
    with one core busy they had decoded at 5 tok/s where plain decoding on one thread made 96, and adaptive k
    never saw drafting lose (both sides ran slow). The tokens stay greedy's."""
    from qwen35.speculation import Speculation

    model, prompt, params, plain, g = governed_bundled(max_tokens=30)
    kinds = []
    run = g.run
    g.run = lambda kind, fn, work=1.0: run(kind, lambda: (kinds.append(kind), fn())[1], work)
    spec = Speculation(draft_tokens=2)
    assert [r.token for r in qwen35.generate_step(model, prompt, params=params, speculative=spec)] == plain
    # every round (one with no room left to draft included) and the MTP prefill
    assert spec.stats.rounds and kinds.count("speculative") >= spec.stats.rounds and "prefill" in kinds
