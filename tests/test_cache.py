"""The cache contract: growth, sizes, snapshot/restore at exact positions, rows that join and leave a batch
without moving, copy-on-write between holders, and Gated DeltaNet state that no layer writes in place."""

import pytest
import torch

import qwen35
from qwen35.cache import KV_GROWTH_STEP, CacheError, HybridCache


@pytest.fixture(scope="module")
def model(vlm_replicas):
    return qwen35.load_model(vlm_replicas[2][1])


@pytest.fixture(scope="module")
def bf16_model(vlm_replicas):
    """As users get it: bf16, fused, kernels bound where the CPU has them."""
    return qwen35.load_model(vlm_replicas[2][1], dtype=torch.bfloat16, kernels=True)


def rand_ids(n, seed, B=1):
    return torch.randint(0, 320, (B, n), generator=torch.Generator().manual_seed(seed))


def attention_rows(cache):
    return [[buf for buf in row.kv] for row in cache.rows]


def test_kv_grows_in_steps_and_keeps_content(model):
    cache = model.make_cache()
    x = rand_ids(KV_GROWTH_STEP + 4, 0)
    full = model(x)
    model(x[:, :3], cache=cache)
    model(x[:, 3 : KV_GROWTH_STEP + 3], cache=cache)
    last = model(x[:, KV_GROWTH_STEP + 3 :], cache=cache)
    buf = cache.rows[0].kv[0]
    assert cache.lengths == [KV_GROWTH_STEP + 4] and buf.capacity == 2 * KV_GROWTH_STEP
    assert (last[:, -1] - full[:, -1]).abs().max() <= 1e-4
    c = model.config
    per_token = 2 * c.num_key_value_heads * c.head_dim * 4 * len(c.full_attention_layers)
    state = sum(s.nbytes for s in cache.deltanet)
    assert cache.nbytes == per_token * (KV_GROWTH_STEP + 4) + state


def test_snapshot_restore_continues_identically(model):
    x = rand_ids(90, 0)
    cache = model.make_cache()
    model(x[:, :50], cache=cache)
    snap = cache.snapshot()
    after = model(x[:, 50:], cache=cache)
    # diverge with other tokens, then come back to position 50 and redo
    model(torch.randint(0, 320, (1, 30)), cache=cache)
    cache.restore(snap)
    assert cache.offset == 50
    again = model(x[:, 50:], cache=cache)
    assert torch.equal(after, again)
    # the snapshot is independent: restoring twice works
    cache.restore(snap)
    assert torch.equal(model(x[:, 50:], cache=cache), after)


def test_bf16_kernels_snapshot_restore_continues_identically(bf16_model):
    """The same at bf16 with the C++ decode kernels bound: restore, diverge, restore, continue token by token."""
    model = bf16_model
    x = rand_ids(40, 3)
    cache = model.make_cache()
    with torch.inference_mode():
        model(x[:, :30], cache=cache)
        snap = cache.snapshot()
        after = [model(x[:, i : i + 1], cache=cache) for i in range(30, 40)]
        for i in range(5):
            model(torch.tensor([[7 + i]]), cache=cache)
        cache.restore(snap)
        again = [model(x[:, i : i + 1], cache=cache) for i in range(30, 40)]
    assert all(torch.equal(a, b) for a, b in zip(after, again))


def test_deltanet_state_is_constant_size(model):
    cache = model.make_cache()
    model(torch.randint(0, 320, (1, 10)), cache=cache)
    sizes = [s.nbytes for s in cache.deltanet]
    model(torch.randint(0, 320, (1, 200)), cache=cache)
    assert sizes == [s.nbytes for s in cache.deltanet]
    assert cache.lengths == [210]


@pytest.mark.parametrize("which", ["reference", "kernels"])
def test_no_layer_writes_deltanet_state_in_place(model, bf16_model, which):
    """O(1) snapshots hold the Gated DeltaNet tensors by reference: every layer must assign new ones."""
    m = model if which == "reference" else bf16_model
    cache = m.make_cache(2)
    with torch.inference_mode():
        m(rand_ids(12, 1, B=2), cache=cache)
        held = [(s.conv, s.recurrent) for s in cache.deltanet]
        copies = [(c.clone(), r.clone()) for c, r in held]
        m(rand_ids(1, 2, B=2), cache=cache)  # a decode step (the fused kernels under "kernels")
        m(rand_ids(9, 3, B=2), cache=cache)  # a prefill chunk
    for (c, r), (c0, r0) in zip(held, copies):
        assert torch.equal(c, c0) and torch.equal(r, r0)
    assert all(s.recurrent is not r for s, (_, r) in zip(cache.deltanet, held))


def test_a_second_cache_restored_from_a_snapshot_never_overwrites_the_first(model):
    """Cache A goes on past a snapshot; cache B restores that snapshot and writes other tokens at the same
    positions (two requests sharing a prompt prefix): A's keys must stay A's."""
    x = rand_ids(40, 4)
    a = model.make_cache()
    model(x[:, :20], cache=a)
    snap = a.snapshot()
    model(x[:, 20:30], cache=a)
    b = model.make_cache()
    b.restore(snap)
    model(rand_ids(15, 5), cache=b)
    ref = model.make_cache()
    model(x[:, :20], cache=ref)
    model(x[:, 20:30], cache=ref)
    assert torch.equal(model(x[:, 30:], cache=a), model(x[:, 30:], cache=ref))


def test_rows_restored_from_one_snapshot_write_their_own_tokens(model, bf16_model):
    """Two rows restored from one snapshot stand at one length in one buffer: written in place, the second
    row's token overwrote the first's (a batch of them was 0.26 off each row's lone logits; the server's
    concurrent requests with one cached prefix share buffers so, and once a growing buffer took its holders
    along, two requests' reserves did too). A row copies when another row stands at its length."""
    x = rand_ids(20, 30)
    for m, tol in ((model, 1e-4), (bf16_model, 0.0)):
        src = m.make_cache()
        m(x, cache=src)
        snap = src.snapshot()

        def restored():
            c = m.make_cache()
            c.restore(snap)
            return c

        nxt = rand_ids(1, 31, B=2)
        alone = [m(nxt[b : b + 1], cache=restored()) for b in range(2)]
        if tol:  # (bf16 rows in one batch round differently from lone rows: the merged case in fp32)
            out = m(nxt, cache=HybridCache.merge([restored(), restored()]))
            for b in range(2):
                assert (out[b] - alone[b][0]).abs().max() <= tol
        # two requests, each reserving its room first (growth had moved the other's row along with it)
        a, b = restored(), restored()
        a.reserve(300, exact=True)
        b.reserve(300, exact=True)
        ya, yb = m(nxt[0:1], cache=a), m(nxt[1:2], cache=b)
        assert torch.equal(ya, alone[0]) and torch.equal(yb, alone[1])
        assert torch.equal(m(nxt[1:2], cache=a), m(nxt[1:2], cache=restored_then(m, snap, nxt[0:1])))


def restored_then(m, snap, ids):
    c = m.make_cache()
    c.restore(snap)
    m(ids, cache=c)
    return c


def test_rollback_onto_own_snapshot_writes_in_place(model):
    cache = model.make_cache()
    model(rand_ids(20, 6), cache=cache)
    snap = cache.snapshot()
    bufs = attention_rows(cache)[0]
    model(rand_ids(3, 7), cache=cache)
    cache.restore(snap)
    model(rand_ids(3, 8), cache=cache)
    assert [b.k.data_ptr() for b in cache.rows[0].kv] == [b.k.data_ptr() for b in bufs]


def test_merge_and_filter_move_no_kv_and_match_each_row_alone(model):
    prompts = [rand_ids(n, 10 + n) for n in (5, 300, 17)]
    singles, alone = [], []
    for p in prompts:
        c = model.make_cache()
        model(p, cache=c)
        singles.append(c)
        a = model.make_cache()
        model(p, cache=a)
        alone.append(a)
    ptrs = [[b.k.data_ptr() for b in c.rows[0].kv] for c in singles]
    batch = HybridCache.merge(singles)
    assert batch.lengths == [5, 300, 17]
    assert [[b.k.data_ptr() for b in row.kv] for row in batch.rows] == ptrs  # nothing moved
    nxt = rand_ids(1, 20, B=3)
    out = model(nxt, cache=batch)
    for b in range(3):
        assert (out[b] - model(nxt[b : b + 1], cache=alone[b])[0]).abs().max() <= 1e-4
    batch.filter([2, 0])
    assert batch.lengths == [18, 6]
    assert [b.k.data_ptr() for b in batch.rows[0].kv] == ptrs[2]
    nxt = rand_ids(1, 21, B=2)
    out = model(nxt, cache=batch)
    assert (out[0] - model(nxt[0:1], cache=alone[2])[0]).abs().max() <= 1e-4
    assert (out[1] - model(nxt[1:2], cache=alone[0])[0]).abs().max() <= 1e-4


def test_reserve_then_forward_allocates_nothing(model):
    cache = model.make_cache()
    model(rand_ids(KV_GROWTH_STEP - 2, 30), cache=cache)
    cache.reserve(8)
    ptrs = [b.k.data_ptr() for b in cache.rows[0].kv]
    model(rand_ids(8, 31), cache=cache)
    assert [b.k.data_ptr() for b in cache.rows[0].kv] == ptrs


def test_kv_growth_stops_at_the_models_context(model):
    """Doubling never takes a buffer past max_position_embeddings (from 196K tokens a 262K model would ask for
    393K slots); a forward that needs more than the context still gets its room (the context check is
    generation's, not the cache's), grown the amortised way: a caller's own loop past the context had
    reallocated and copied every buffer for each token."""
    from dataclasses import replace

    limit = 3 * KV_GROWTH_STEP + 100
    m = qwen35.Qwen35ForCausalLM(replace(model.config, max_position_embeddings=limit))
    cache = m.make_cache()
    row, kv = cache.rows[0], cache.layers[m.config.full_attention_layers[0]]
    caps = []
    for n in (KV_GROWTH_STEP, KV_GROWTH_STEP, KV_GROWTH_STEP, 100, 7, 1, 1, 1):
        kv.buffers(n)
        cache.advance(n)
        caps.append(row.kv[0].capacity)
    past = -(-2 * limit // KV_GROWTH_STEP) * KV_GROWTH_STEP
    assert caps == [KV_GROWTH_STEP, 2 * KV_GROWTH_STEP, limit, limit] + [past] * 4


def test_generate_step_reserves_the_request_once(model):
    """generate_step makes the KV room for prompt + max_tokens before prefill: one allocation, sized to the
    request, instead of a doubling per prefill chunk (each growth copies every token held so far)."""
    cache = model.make_cache()
    ids = rand_ids(2 * KV_GROWTH_STEP + 5, 50)[0].tolist()
    params = qwen35.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    made = []
    buffers = type(cache.layers[model.config.full_attention_layers[0]])._make

    def spy(self, capacity):
        made.append(capacity)
        return buffers(self, capacity)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(cache.layers[model.config.full_attention_layers[0]]), "_make", spy)
        out = [r.token for r in qwen35.generate_step(model, ids, cache=cache, params=params, prefill_chunk_size=64)]
    assert len(out) == 3
    assert made == [3 * KV_GROWTH_STEP] * len(model.config.full_attention_layers)


def test_a_prompt_prefilled_in_inference_mode_continues_outside_it(model):
    """KV buffers are normal tensors even when made under torch.inference_mode(): a cache prefilled there is
    continued by generate_step (no_grad), which used to fail writing into an inference tensor."""
    ids = rand_ids(20, 60)[0].tolist()
    params = qwen35.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = [r.token for r in qwen35.generate_step(model, ids, params=params)]
    cache = model.make_cache()
    with torch.inference_mode():
        model(torch.tensor([ids[:-1]]), cache=cache)
    assert [r.token for r in qwen35.generate_step(model, ids[-1:], cache=cache, params=params)] == want


def test_from_tensors_and_one_row_snapshot(model):
    x = rand_ids(12, 40, B=2)
    cache = model.make_cache(2)
    model(x, cache=cache)
    states = []
    for i, layer in enumerate(cache.layers):
        if i in model.config.full_attention_layers:
            ks = torch.stack([r.kv[layer.j].k[:, :12] for r in cache.rows])
            vs = torch.stack([r.kv[layer.j].v[:, :12] for r in cache.rows])
            states.append((ks, vs))
        else:
            states.append((layer.conv, layer.recurrent))
    rebuilt = HybridCache.from_tensors(model.cache_layout(), states)
    assert rebuilt.lengths == [12, 12]
    one = model.make_cache()
    one.restore(cache.snapshot(rows=[1]))
    nxt = rand_ids(3, 41, B=2)
    a, b = model(nxt, cache=rebuilt), model(nxt[1:], cache=one)
    assert torch.equal(a, model(nxt, cache=cache))
    assert (a[1:] - b).abs().max() <= 1e-5  # batch 2 vs batch 1 matmuls round differently


def test_bad_rows_and_layouts_are_clear_errors(model):
    cache = model.make_cache(2)
    with pytest.raises(qwen35.Qwen35Error, match=r"rows \[5\] out of range for a batch of 2"):  # a CacheError,
        cache.filter([0, 5])  # which `except qwen35.Qwen35Error` catches like every other input error
    with pytest.raises(CacheError, match="rows hold different numbers of tokens"):
        c = HybridCache.merge([model.make_cache(), model.make_cache()])
        model(rand_ids(3, 0), cache=_first_row(c))
        c.offset
    with pytest.raises(CacheError, match="snapshot does not fit this cache's layout"):
        model.make_mtp_cache().restore(cache.snapshot())


def _first_row(c):
    # a batch-1 view sharing row 0 of c (the row object itself): advancing it makes c's rows unequal
    one = HybridCache(c.layout, [c.rows[0]], [type(s)(s.conv[:1], s.recurrent[:1]) for s in c.deltanet])
    return one


def test_rotary_offset_moves_positions_and_snapshots_carry_it(model):
    """A row's rope_delta (M-RoPE positions that advance by an image grid, not by the token count) shifts
    the rotary positions of its next tokens; a snapshot brings it back with the row. (RoPE is relative, so
    the shift shows only between tokens fed before and after it.)"""
    x, nxt = rand_ids(8, 50), rand_ids(2, 51)
    cache = model.make_cache()
    model(x, cache=cache)
    cache.rows[0].rope_delta = 5
    snap = cache.snapshot()
    shifted = model(nxt, cache=cache)
    full = model(torch.cat([x, nxt], 1), positions=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 13, 14]))[:, -2:]
    assert (shifted - full).abs().max() <= 1e-5
    plain = model.make_cache()
    model(x, cache=plain)
    assert (shifted - model(nxt, cache=plain)).abs().max() > 1e-3  # the offset is visible at all
    other = model.make_cache()
    other.restore(snap)
    assert other.rows[0].rope_delta == 5 and torch.equal(model(nxt, cache=other), shifted)


def test_generate_step_never_grows_past_the_answers_end(model, monkeypatch):
    """Decoding past the room made before prefill grows the KV as doubling would, but never past prompt +
    max_tokens: a 3000-token prompt with max_tokens 1100 had ended at 8192 slots (1.9x what it can use, 3x
    while the old buffer was copied). Same tokens as a run with all the room made up front."""
    from qwen35 import generation

    monkeypatch.setattr(generation, "RESERVE_DECODE_TOKENS", 16)
    ids = rand_ids(200, 51)[0].tolist()
    params = qwen35.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    cache = model.make_cache()
    out = [r.token for r in qwen35.generate_step(model, ids, cache=cache, params=params)]
    caps = {b.capacity for b in cache.rows[0].kv}
    assert cache.lengths == [200 + 400 - 1] and caps == {-(-(200 + 399) // KV_GROWTH_STEP) * KV_GROWTH_STEP}
    ample = model.make_cache()
    ample.reserve(600)
    assert [r.token for r in qwen35.generate_step(model, ids, cache=ample, params=params)] == out
    assert cache.room == caps.pop() - 599 and ample.room == ample.rows[0].kv[0].capacity - 599


def test_batch_generate_never_grows_past_the_answers_end(model, monkeypatch):
    """batch_generate makes each prompt's room before its prefill and grows rows as generate_step does."""
    from qwen35 import generation

    monkeypatch.setattr(generation, "RESERVE_DECODE_TOKENS", 16)
    prompts = [rand_ids(200, 52)[0].tolist(), rand_ids(30, 53)[0].tolist()]
    params = qwen35.SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    caps = []
    real = generation.step

    def spy(model, cache, streams, isolate=False):
        caps.append([{b.capacity for b in r.kv} for r in cache.rows])
        return real(model, cache, streams, isolate)

    monkeypatch.setattr(generation, "step", spy)
    out = qwen35.batch_generate(model, prompts, params)
    end = -(-(200 + 299) // KV_GROWTH_STEP) * KV_GROWTH_STEP
    assert caps[0] == [{KV_GROWTH_STEP}, {KV_GROWTH_STEP}] and caps[-1] == [{end}, {end}]
    monkeypatch.setattr(generation, "step", real)
    assert [[r.token for r in rs] for rs in out] == [[r.token for r in qwen35.generate_step(model, p, params=params)]
                                                    for p in prompts]
