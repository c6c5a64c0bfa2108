"""guide.py: thinking budgets and loop breaking on token ids (no model), and the phases of one row."""

import pytest
import torch

from qwen35.guide import LOOP_MIN_REPEATS, LOOP_MIN_TOKENS, Guide, GuideSpec, loop_span

OPEN, CLOSE, NL2, EOS = 900, 901, 902, 903
SPEC = GuideSpec(OPEN, CLOSE, (NL2,), frozenset({5}), (EOS,))


def feed(guide: Guide, tokens):
    """Drive a row as Stream.sample does: a forced token replaces the next one offered."""
    out = []
    it = iter(tokens)
    while True:
        t = guide.forced()
        if t is None:
            t = next(it, None)
            if t is None:
                return out
        guide.advance(t)
        out.append(t)


def test_loop_span():
    assert loop_span([1, 2, 3] * 22) == 3  # 66 tokens of a 3-token span
    assert loop_span([1, 2, 3] * 21) == 0  # 63 < LOOP_MIN_TOKENS
    assert loop_span([7] * LOOP_MIN_TOKENS) == 1 and loop_span([7] * (LOOP_MIN_TOKENS - 1)) == 0
    span = list(range(40))
    assert loop_span(span * LOOP_MIN_REPEATS) == 40 and loop_span(span * (LOOP_MIN_REPEATS - 1)) == 0
    assert loop_span([9, 8] + [1, 2, 3, 4] * 16) == 4  # the loop is the tail; what came before does not matter
    assert loop_span(list(range(200))) == 0 and loop_span([]) == 0


def test_thinking_open_reads_the_prompt_tail():
    assert SPEC.thinking_open([1, 2, OPEN, 5]) and SPEC.thinking_open([OPEN])
    assert not SPEC.thinking_open([OPEN, 3]) and not SPEC.thinking_open([OPEN, 5, CLOSE, 5]) and not SPEC.thinking_open([])


def test_budget_closes_the_reasoning_and_the_answer_follows():
    spec = GuideSpec(OPEN, CLOSE, (NL2,), frozenset(), (EOS,), max_thinking_tokens=4)
    g = spec.start([OPEN])
    out = feed(g, [10, 11, 12, 13, 14, 15, EOS])
    assert out == [10, 11, 12, 13, CLOSE, NL2, 14, 15, EOS] and g.cut == "budget" and not g.reasoning
    g = spec.start([OPEN])  # the model closing first: nothing is inserted, nothing reported
    assert feed(g, [10, CLOSE, 20]) == [10, CLOSE, 20] and g.cut is None
    g = spec.start([3])  # thinking off: no budget to spend
    assert feed(g, [10] * 8) == [10] * 8 and g.cut is None
    zero = GuideSpec(OPEN, CLOSE, (NL2,), frozenset(), (EOS,), max_thinking_tokens=0).start([OPEN])
    assert feed(zero, [10]) == [CLOSE, NL2, 10] and zero.cut == "budget"


def test_a_loop_is_closed_once_it_covers_the_minimum():
    spec = GuideSpec(OPEN, CLOSE, (NL2,), frozenset(), (EOS,), break_loops=True)
    g = spec.start([OPEN])
    loop = [1, 2, 3, 4, 5, 6, 7, 8] * 20
    out = feed(g, loop)
    assert out[:LOOP_MIN_TOKENS] == loop[:LOOP_MIN_TOKENS] and out[LOOP_MIN_TOKENS:LOOP_MIN_TOKENS + 2] == [CLOSE, NL2]
    assert g.cut == "loop" and len(out) == len(loop) + 2
    g = spec.start([OPEN])
    varied = list(range(300))
    assert feed(g, varied) == varied and g.cut is None and g.reasoning


def test_no_end_of_turn_inside_the_reasoning_of_a_constrained_row():
    g = Guide(SPEC, reasoning=True)
    logits = torch.zeros(1, 1000)
    assert g.mask(logits) is logits  # no grammar: untouched
    g.matcher = object()  # a grammar is present: stop ids are banned until </think>
    masked = g.mask(logits)
    assert masked[0, EOS] == float("-inf") and masked[0, 10] == 0 and logits[0, EOS] == 0


@pytest.mark.parametrize("budget", [1, 7])
def test_each_row_keeps_its_own_state(budget):
    spec = GuideSpec(OPEN, CLOSE, (NL2,), frozenset(), (EOS,), max_thinking_tokens=budget)
    a, b = spec.start([OPEN]), spec.start([OPEN])
    for t in [10] * budget:
        a.advance(t)
    assert a.forced() == CLOSE and b.forced() is None and b.thinking == []
