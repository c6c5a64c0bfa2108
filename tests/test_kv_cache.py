"""The q8_0 KV cache (kv_storage.py): its kernels against the dequantize-then-attend reference, its
distance from a bf16 cache, and the cache contract (snapshots, prompt reuse, batching, speculation)
unchanged with it."""

import subprocess
import sys

import pytest
import torch

import qwen35
from qwen35 import kv_storage
from qwen35.cache import CacheError, HybridCache
from qwen35.commands.replica import build_replica
from qwen35.kv_storage import KVBuffer, Q8KVBuffer, attend_reference, dequantize_rows, quantize_rows
from qwen35.ops import attention, kernels
from qwen35.ops.attention import decode_attention, decode_attention_q8, prompt_attention, prompt_attention_q8
from qwen35.prompt_cache import PromptCache
from qwen35.quant.formats import QuantError, quantize_q8_0
from qwen35.speculative import speculative_generate_step

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"kernels unavailable: {kernels.unavailable_reason()}")
# as users run it (kernels on), and the torch path a machine without them runs (kernels off)
KERNEL_MODES = [pytest.param(True, id="kernels", marks=needs_kernels), pytest.param(False, id="torch")]
GREEDY = qwen35.SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(-1,))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tokens(model, ids, params=GREEDY, cache=None):
    return [r.token for r in qwen35.generate_step(model, ids, cache=cache, params=params)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv") / "tiny"
    build_replica(d, "tiny", seed=3)
    return d


@pytest.fixture(scope="module")
def bundled():
    from qwen35.commands.common import default_model

    return default_model()


def test_q8_0_rows_are_ggufs_q8_0_blocks():
    """Keys are quantized with quant/formats.py's Q8_0 reference (the same bytes as a weight row), blocks
    along the head dimension; dequantized within half a step of each block's scale, plus the fp16 rounding
    of that scale (relative 2^-11) over at most 127 steps."""
    x = torch.randn(2, 7, 64).bfloat16()
    q, d = quantize_rows(x)
    wq, wd = quantize_q8_0(x.reshape(-1, 64))
    assert torch.equal(q.reshape(-1, 64), wq) and torch.equal(d.reshape(-1, 2), wd)
    err = (dequantize_rows(q, d, torch.float32) - x.float()).abs()
    assert (err <= d.float().repeat_interleave(32, -1) * (0.5 + 127 / 2048)).all()


@needs_kernels
@pytest.mark.parametrize("lengths", [[1], [70, 5], [1500, 3, 600]])
@pytest.mark.parametrize("G,D", [(1, 64), (2, 256), (4, 256), (8, 128), (4, 96)])  # 96: an odd block count
def test_q8_0_decode_attention_matches_its_reference(lengths, G, D):
    """attn_decode_q8 reads the int8 blocks in place (and dots them with the query in Q8_0 blocks); the
    reference dequantizes and attends in torch. Against the exact answer (the reference in fp32, the query
    rounded through Q8_0 as the kernel does), the kernel's error must be no larger than the bf16 reference's
    own (its rounding of the dequantized values, the probabilities and the output); and the query's rounding
    costs about what the bf16 reference's own rounding does (at most 1.5x)."""
    gen = torch.Generator().manual_seed(G * 1000 + D + len(lengths))
    Hkv = 2
    q = torch.randn(len(lengths), G * Hkv, D, generator=gen).bfloat16()
    bufs = [Q8KVBuffer.from_values(torch.randn(Hkv, n + 9 * (b + 1), D, generator=gen),
                                   torch.randn(Hkv, n + 9 * (b + 1), D, generator=gen), torch.bfloat16)
            for b, n in enumerate(lengths)]
    out = torch.ops.qwen35.attn_decode_q8(q, [b.k for b in bufs], [b.kd for b in bufs], [b.v for b in bufs],
                                          [b.vd for b in bufs], lengths, D**-0.5)
    exact = attend_reference(q, bufs, lengths, D**-0.5, torch.float32, quantize_query=True)
    ref16 = attend_reference(q, bufs, lengths, D**-0.5, torch.bfloat16, quantize_query=True)
    e_kernel, e_ref = rel(out, exact), rel(ref16, exact)
    assert e_kernel <= 1.25 * e_ref, (e_kernel, e_ref)
    unrounded = attend_reference(q, bufs, lengths, D**-0.5, torch.float32)
    assert rel(exact, unrounded) <= 1.5 * e_ref, (rel(exact, unrounded), e_ref)


def largest_sums_cache(D, Hkv=2, n=1500):
    """A q8_0 cache of n identical keys (every key of a block probability 1) whose value rows are all the same row
    of +-1.5, +-127 of one scale: every P.V term the largest there is. Returns (buffer, that row [1, 1, D], the
    generator, for the query's draws after it)."""
    gen = torch.Generator().manual_seed(D)
    key = torch.randn(1, 1, D, generator=gen).expand(Hkv, n, D)
    row = torch.where(torch.rand(1, 1, D, generator=gen) < 0.5, -1.5, 1.5)
    buf = Q8KVBuffer.from_values(key, row.expand(Hkv, n, D), torch.bfloat16)
    assert buf.v[:, :n].abs().min() == 127
    return buf, row, gen


@needs_kernels
@pytest.mark.parametrize("G,D", [(4, 256), (2, 96)])
def test_q8_0_attention_at_the_largest_integer_sums(G, D):
    """The kernel's P.V sums int16 probability-times-scale weights (at most 32767) times int8 values in int32:
    identical keys give every key of a block probability 1, and values at +-127 of one scale make every
    term the largest there is, 512 keys of 127 * 32767 a block, just under 2^31. The answer is the value row
    itself; a sum that wrapped, or a weight rounded past 32767 into int16's negatives, would not be."""
    buf, row, gen = largest_sums_cache(D)
    Hkv, n = buf.k.shape[0], buf.k.shape[1]
    q = torch.randn(1, G * Hkv, D, generator=gen).bfloat16()
    out = torch.ops.qwen35.attn_decode_q8(q, [buf.k], [buf.kd], [buf.v], [buf.vd], [n], D**-0.5)
    torch.testing.assert_close(out.float(), row.expand(1, G * Hkv, D), rtol=2**-8, atol=0)


def q8_buffer(Hkv, n, D, seed, room=5):
    """A q8_0 buffer holding n random keys (x3: peaked softmaxes) and values, with `room` slots past them (the
    attention reads views of a longer buffer, as a cache's are)."""
    gen = torch.Generator().manual_seed(seed)
    return Q8KVBuffer.from_values(torch.randn(Hkv, n + room, D, generator=gen) * 3,
                                  torch.randn(Hkv, n + room, D, generator=gen), torch.bfloat16)


def plain_attention(q, k, v, past):
    """fp64 causal attention of q [1, Hq, T, D] at positions past.. over k, v [1, Hkv, past + T, D]: the whole
    thing at once, the mask built."""
    T, S, G = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    visible = torch.arange(S)[None, :] <= (past + torch.arange(T))[:, None]
    return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v


@pytest.fixture
def dequantized(monkeypatch):
    """Rows of every dequantize_rows call from here on (the seam through which a q8_0 buffer is expanded: the
    largest such call bounds what attention over it holds at once)."""
    rows = []
    real = kv_storage.dequantize_rows

    def spy(q, d, dtype):
        rows.append(q.shape[-2])
        return real(q, d, dtype)

    monkeypatch.setattr(kv_storage, "dequantize_rows", spy)
    return rows


PAST = attention.KEY_BLOCK + 1001  # over more than one block of keys, an odd number of them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_0_prompt_attention_is_attention_over_the_dequantized_prefix(dtype, dequantized):
    """The torch form a machine without the kernels runs: a prompt chunk over a q8_0 prefix longer than one
    KEY_BLOCK (an odd length) equals plain attention over the dequantized keys and values, up to float
    rounding (fp32: the order of the sums; bf16: no further from the exact answer than prompt_attention over
    the prefix dequantized whole, the path it replaces). It dequantizes each key and value once, a block of at
    most KEY_BLOCK at a time."""
    T, Hkv, G, D = 37, 2, 4, 64
    buf = q8_buffer(Hkv, PAST + T, D, seed=T)
    q = torch.randn(1, Hkv * G, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = prompt_attention_q8(q, buf, PAST, D**-0.5)
    assert max(dequantized) <= attention.KEY_BLOCK and sum(dequantized) == 2 * (PAST + T)
    k, v = (t[None] for t in buf.read(PAST + T, dtype))
    exact = plain_attention(q, k, v, PAST)
    assert out.dtype == dtype and out.shape == q.shape
    if dtype == torch.float32:
        assert (out - exact).abs().max() <= 1e-5
    else:
        e_new, e_whole = rel(out, exact), rel(prompt_attention(q, k, v, PAST, D**-0.5), exact)
        assert e_new <= 1.25 * e_whole, (e_new, e_whole)


def test_q8_0_decode_attention_reads_blocks_of_the_same_numbers(dequantized):
    """The torch decode form over a q8_0 buffer: decode_attention over the prefix dequantized whole, bit for
    bit (the same blocks of keys, the same sums), with at most KEY_BLOCK keys dequantized at a time."""
    Hkv, G, D, n = 2, 4, 64, PAST
    buf = q8_buffer(Hkv, n, D, seed=2)
    q = torch.randn(1, Hkv * G, 1, D, generator=torch.Generator().manual_seed(3)).bfloat16()
    out = decode_attention_q8(q, buf, n, D**-0.5)
    assert max(dequantized) <= attention.KEY_BLOCK and sum(dequantized) == 2 * n
    k, v = buf.read(n, torch.bfloat16)
    assert torch.equal(out, decode_attention(q, k[None], v[None], D**-0.5))


@needs_kernels
@pytest.mark.parametrize("Hkv,G,D,past,T", [
    (2, 4, 256, 701, 53),    # cached keys over 3 of the kernel's blocks of 256 keys, an odd count
    (1, 1, 64, 5, 2),        # a tile far from full
    (2, 2, 96, 300, 17),     # D = 96: three Q8_0 blocks a row
    (2, 8, 128, 4999, 129),  # G = 8, past more than one KEY_BLOCK
])
def test_q8_0_prefill_kernel_is_prefill_attn_over_the_dequantized_prefix(Hkv, G, D, past, T, dequantized):
    """prefill_attn_q8 dequantizes each block of keys as it packs it: bit for bit prefill_attn over the
    dequantized prefix (the path it replaces), reading views of a longer buffer in place; and the bound form
    dequantizes nothing in torch."""
    from qwen35.ops.step_forms import prefill_attention_q8

    buf = q8_buffer(Hkv, past + T, D, seed=past, room=13)
    q = torch.randn(1, Hkv * G, T, D, generator=torch.Generator().manual_seed(T)).bfloat16()
    out = prefill_attention_q8(q, buf, past, D**-0.5)
    assert dequantized == []
    k, v = buf.read(past + T, torch.bfloat16)
    assert torch.equal(out[0], torch.ops.qwen35.prefill_attn(q[0], k, v, past, D**-0.5))


@pytest.mark.parametrize("kernels_on", KERNEL_MODES)
def test_q8_0_prefill_through_the_model_is_the_whole_prefix_path(tiny_dir, kernels_on, dequantized, monkeypatch):
    """The tiny replica prefilling a q8_0 cache in chunks of 13 (KEY_BLOCK cut to 16, so the torch form reads
    every prefix in several blocks): its logits are those of the path it replaces (KVCache.update dequantizing
    each row's whole prefix, then the prompt attention): bit for bit on the kernels (bf16), within float
    rounding on the torch forms (fp32: in bf16 the sums' order moves logits by bf16 steps); and no
    dequantize_rows call expands more than a block (on the kernels: none)."""
    from qwen35.model.attention import GatedAttention

    monkeypatch.setattr(attention, "KEY_BLOCK", 16)
    dtype = torch.bfloat16 if kernels_on else torch.float32
    model = qwen35.load_model(tiny_dir, dtype=dtype, kernels=kernels_on, kv_cache="q8_0")
    ids = torch.randint(0, 4000, (1, 70), generator=torch.Generator().manual_seed(4))

    def run():
        c = model.make_cache()
        with torch.inference_mode():
            return torch.cat([model(ids[:, s : s + 13], cache=c) for s in range(0, 70, 13)], 1).float()

    got = run()
    if kernels_on:
        assert dequantized == []
    else:
        assert dequantized and max(dequantized) <= 16

    def whole_prefix(self, q, k, v, state, scale):  # what forward did before
        T = q.shape[2]
        return torch.cat([self.prompt_attention(q[b : b + 1], kb, vb, kb.shape[2] - T, scale)
                          for b, (kb, vb) in enumerate(state.update(k, v))])

    monkeypatch.setattr(GatedAttention, "_attend_q8", whole_prefix)
    want = run()
    if kernels_on:
        assert torch.equal(got, want)
    else:
        assert rel(got, want) <= 1e-4, rel(got, want)  # (measured 6e-6)


@needs_kernels
def test_decode_step_writes_the_reference_bytes(tiny_dir):
    """The whole-layer decode kernel quantizes each new key and value itself: the bytes must be what the
    torch reference quantizer makes of the bf16 key the same kernel writes into a bf16 cache."""
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=True)
    assert "attn_layer" in qwen35.bind_kernels(model, True).bound
    ids = torch.randint(0, 4000, (1, 21), generator=torch.Generator().manual_seed(0))
    caches = {fmt: model.make_cache(kv_cache=fmt) for fmt in ("bf16", "q8_0")}
    with torch.inference_mode():
        for c in caches.values():
            model(ids[:, :20], cache=c)  # prefill: the reference path
            model(ids[:, 20:], cache=c)  # one decode step: the kernel
    # the first attention layer: its input does not depend on any KV, so both caches saw the same key
    bb, qb = caches["bf16"].rows[0].kv[0], caches["q8_0"].rows[0].kv[0]
    assert isinstance(qb, Q8KVBuffer) and type(bb) is KVBuffer
    for vals, q, d in ((bb.k, qb.k, qb.kd), (bb.v, qb.v, qb.vd)):
        want_q, want_d = quantize_rows(vals[:, :21])
        assert torch.equal(q[:, :21], want_q) and torch.equal(d[:, :21], want_d)


def decode_logits(model, prompts, steps, kv_cache):
    """Prefill each prompt alone, merge the rows into one batch, decode the last `steps` tokens together."""
    caches = []
    with torch.inference_mode():
        for p in prompts:
            c = model.make_cache(kv_cache=kv_cache)
            model(p[None, : len(p) - steps], cache=c)
            caches.append(c)
        cache = HybridCache.merge(caches)
        return torch.cat([model(torch.stack([p[len(p) - steps + i] for p in prompts])[:, None], cache=cache)
                          for i in range(steps)], 1)


@needs_kernels
@pytest.mark.parametrize("whole_layers", [True, False])
def test_fast_q8_0_decode_error_is_that_of_the_reference(tiny_dir, whole_layers):
    """The model with kernels bound and a q8_0 cache vs the fp32 reference with a q8_0 cache: no further from
    it than the bf16 reference path (kernels off) with a q8_0 cache, on rows of different lengths."""
    from qwen35.ops.fast import bind_kernels

    fast = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    kinds = {"attn_layer"} if whole_layers else {"attn_step"}
    assert kinds <= set(bind_kernels(fast, True, whole_layers=whole_layers).bound)
    ref16 = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    ref32 = qwen35.load_model(tiny_dir, dtype=torch.float32, kernels=False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (n,), generator=gen) for n in (40, 9, 23)]
    exact = decode_logits(ref32, prompts, 4, "q8_0")
    e_fast = rel(decode_logits(fast, prompts, 4, "q8_0"), exact)
    e_ref = rel(decode_logits(ref16, prompts, 4, "q8_0"), exact)
    assert e_fast <= 1.25 * e_ref + 1e-3, (e_fast, e_ref)


MAX_MEAN_KL = 0.002  # the target for the q8_0 KV cache against the bf16 one


@pytest.mark.parametrize("kernels_on", KERNEL_MODES)
def test_long_generation_with_q8_0_kv_stays_within_the_kl_of_bf16_kv(bundled, kernels_on):
    """300 tokens generated greedily with a bf16 cache, then the same tokens fed one decode step at a time
    (the kernels, as users run it, or the torch path) with a bf16 and a q8_0 cache: the next-token
    distributions differ by a mean KL of at most MAX_MEAN_KL nats."""
    model, tok = qwen35.load(bundled, dtype=torch.bfloat16, kernels=kernels_on)
    prompt = tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    params = qwen35.SamplingParams(temperature=0, max_tokens=300, stop_token_ids=(-1,))
    seq = prompt + tokens(model, prompt, params)
    logp = {}
    with torch.inference_mode():
        for fmt in ("bf16", "q8_0"):
            c = model.make_cache(kv_cache=fmt)
            model(torch.tensor([prompt[:-1]]), cache=c)
            steps = [model(torch.tensor([[t]]), cache=c)[0, -1] for t in seq[len(prompt) - 1 : -1]]
            logp[fmt] = torch.log_softmax(torch.stack(steps).float(), -1)
    kl = (logp["bf16"].exp() * (logp["bf16"] - logp["q8_0"])).sum(-1)
    assert len(kl) == 300 and kl.mean().item() <= MAX_MEAN_KL, kl.mean().item()


@pytest.mark.parametrize("kernels_on", KERNEL_MODES)
def test_snapshot_restore_and_prompt_reuse_are_exact_with_q8_0(bundled, kernels_on):
    """A q8_0 cache snapshotted, sent down another path and restored continues token for token like a run
    never interrupted; a prompt cache restores q8_0 prefixes the same way."""
    model, tok = qwen35.load(bundled, dtype=torch.bfloat16, kernels=kernels_on, kv_cache="q8_0")
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. Then the dog")
    want = tokens(model, prompt)
    cache = model.make_cache()
    assert cache.layout.kv_cache == "q8_0"
    with torch.inference_mode():
        model(torch.tensor([prompt[:-1]]), cache=cache)
        snap = cache.snapshot()
        for t in tok.encode(" something else entirely, for a while"):  # overwrites slots past the snapshot
            model(torch.tensor([[t]]), cache=cache)
    cache.restore(snap)
    assert tokens(model, prompt[-1:], cache=cache) == want
    cache.restore(snap)
    assert tokens(model, prompt[-1:], cache=cache) == want  # the snapshot stays usable
    pc = PromptCache(model)
    first = [r.token for r in qwen35.stream_generate(model, tok, prompt, GREEDY, prompt_cache=pc)]
    again = list(qwen35.stream_generate(model, tok, prompt + first[:5], GREEDY, prompt_cache=pc))
    assert first == want and again[0].cached_tokens == len(prompt)
    assert [r.token for r in again] == tokens(model, prompt + first[:5])


@needs_kernels
def test_rows_joining_and_leaving_a_q8_0_batch_decode_as_alone(bundled):
    """Rows prefilled alone join a running batch at different steps and leave it: each row's greedy tokens
    are those it decodes alone."""
    model, tok = qwen35.load(bundled, dtype=torch.bfloat16, kernels=True, kv_cache="q8_0")
    texts = ("Once upon a time", "import numpy as np\n", "The capital of France is")
    prompts = [tok.encode(t) for t in texts]
    steps = 12
    alone = [tokens(model, p, qwen35.SamplingParams(temperature=0, max_tokens=steps, stop_token_ids=(-1,)))
             for p in prompts]

    def start(p):
        c = model.make_cache()
        logits = model(torch.tensor([p]), cache=c)[:, -1]
        return c, [int(logits.argmax())]

    got = [[] for _ in prompts]
    with torch.inference_mode():
        batch, got[0] = start(prompts[0])
        live = [0]
        for step in range(2 * steps):
            if step in (3, 6):  # row 1 joins at step 3, row 2 at step 6
                c, first = start(prompts[len(live)])
                got[len(live)] = first
                batch = HybridCache.merge([batch, c])
                live.append(len(live))
            done = [i for i, r in enumerate(live) if len(got[r]) == steps]
            if done:  # rows that have all their tokens leave the batch
                batch.filter([i for i in range(len(live)) if i not in done])
                live = [r for i, r in enumerate(live) if i not in done]
            if not live:
                break
            nxt = torch.tensor([[got[r][-1]] for r in live])
            logits = model(nxt, cache=batch)[:, -1]
            for i, r in enumerate(live):
                got[r].append(int(logits[i].argmax()))
    assert got == alone


@needs_kernels
def test_speculative_decoding_with_q8_0_is_plain_decoding_with_q8_0(tiny_dir):
    """Drafts verified against a q8_0 cache and rolled back (keep_steps / rewind, the MTP cache's truncate):
    the same tokens as plain greedy decoding with a q8_0 cache, on random weights (near-ties everywhere)."""
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=True, kv_cache="q8_0")
    ids = torch.randint(0, 4000, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    params = qwen35.SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(-1,))
    want = tokens(model, ids, params)
    for k in (1, 3):
        assert [r.token for r in speculative_generate_step(model, ids, params, k)] == want


def test_bad_kv_cache_values_are_clear_errors(bundled):
    with pytest.raises(QuantError, match=r"unknown KV cache format 'q4' \(known: bf16, q8_0\)"):
        qwen35.load_model(bundled, kv_cache="q4")
    model = qwen35.load_model(bundled, kernels=False)
    with pytest.raises(QuantError, match="unknown KV cache format 'fp8'"):
        model.make_cache(kv_cache="fp8")
    q8 = model.make_cache(kv_cache="q8_0")
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=q8)
    with pytest.raises(CacheError, match="snapshot holds a q8_0 KV cache; this cache stores bf16"):
        model.make_cache().restore(q8.snapshot())
    with pytest.raises(CacheError, match="different KV formats"):
        HybridCache.merge([q8, model.make_cache()])
    cmd = [sys.executable, "-m", "qwen35", "generate", bundled, "--kv-cache", "q4", "--prompt", "hi"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "qwen35 generate: error: argument --kv-cache: invalid choice: 'q4' (choose from 'bf16', 'q8_0') "
        "(see qwen35 generate --help)"]


def test_a_q8_0_layout_whose_head_dim_splits_into_no_blocks_is_refused_when_made():
    """make_cache(kv_cache="q8_0") on a model with head_dim 16 is refused when the cache is made (load_model
    refuses it at load), not at the first forward's first KV write."""
    from qwen35.cache import CacheLayout

    with pytest.raises(QuantError, match="a q8_0 KV cache needs head_dim a multiple of 32, got 16"):
        CacheLayout(["linear_attention", "full_attention"], num_kv_heads=1, head_dim=16, kv_cache="q8_0")
    CacheLayout(["linear_attention"], num_kv_heads=1, head_dim=16, kv_cache="q8_0")  # no attention layer: no KV


def test_q8_0_cache_reports_its_bytes(bundled):
    """nbytes and snapshot sizes count 8.5 bits per value (34 bytes per 32), against 64 for bf16."""
    model = qwen35.load_model(bundled, dtype=torch.bfloat16, kernels=False)
    ids = torch.tensor([list(range(1, 41))])
    sizes = {}
    with torch.inference_mode():
        for fmt in ("bf16", "q8_0"):
            c = model.make_cache(kv_cache=fmt)
            model(ids, cache=c)
            state = sum(s.nbytes for s in c.deltanet)
            sizes[fmt] = (c.nbytes - state, c.snapshot().nbytes - state)
    cfg = model.config
    values = 40 * len(cfg.full_attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim
    assert sizes["bf16"] == (2 * values, 2 * values)
    assert sizes["q8_0"] == (values * 34 // 32, values * 34 // 32)


def test_info_plans_memory_for_a_kv_format(bundled):
    """`qwen35 info --kv-cache q8_0 --context N --memory M`: KV, state, total, and the largest context."""
    cmd = [sys.executable, "-m", "qwen35", "info", bundled, "--context", "4096"]
    out = {fmt: subprocess.run(cmd + ["--kv-cache", fmt, "--memory", "64MB"], capture_output=True, text=True,
                               check=True).stdout for fmt in ("bf16", "q8_0")}
    from qwen35.config import ModelConfig

    cfg = ModelConfig.from_file(bundled)
    per_token = len(cfg.full_attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim
    for fmt, nbytes in (("q8_0", per_token * 34 / 32), ("bf16", per_token * 2)):
        assert f"KV ({fmt}) {nbytes * 4096 / 2**30:.2f} GiB ({nbytes / 1024:.1f} KiB/token)" in out[fmt]
    fits = {f: int(next(ln for ln in o.splitlines() if ln.startswith("fits")).split("up to ")[1].split()[0])
            for f, o in out.items()}
    assert 1.85 < fits["q8_0"] / fits["bf16"] < 1.9  # 64/34 = 1.88 more tokens in the same room
