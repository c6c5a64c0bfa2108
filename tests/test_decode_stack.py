"""The decode stack (ops/decode_stack.py: every layer's decode step in one C++ call) against the per-layer
calls it replaces: the same logits, cache contents and kept per-token states, bit for bit, for bf16 and
quantized weights, a bf16 and a q8_0 KV cache, a batch whose rows hold different lengths, and speculative
verify passes of several tokens; and the calls it must leave to the per-layer loop."""

import pytest
import torch
from test_kernels import needs_kernels

import qwen35
from qwen35.cache import HybridCache
from qwen35.commands.replica import build_replica
from qwen35.ops.fast import bind_kernels


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack") / "tiny"
    build_replica(d, "tiny", seed=11)
    return d


def _run(model, prompts, steps, kv_cache, verify):
    """Prefill each prompt alone, merge the rows, decode `steps` tokens together, then one speculative verify
    pass of `verify` tokens per row with per-token states kept. Returns (logits, the cache)."""
    caches = []
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for p in prompts:
            c = model.make_cache(kv_cache=kv_cache)
            model(p[None], cache=c)
            caches.append(c)
        cache = HybridCache.merge(caches)
        out = [model(torch.randint(0, 4096, (len(prompts), 1), generator=gen), cache=cache) for _ in range(steps)]
        cache.keep_steps(True)
        out.append(model(torch.randint(0, 4096, (len(prompts), verify), generator=gen), cache=cache))
    return torch.cat(out, 1), cache


def _states(cache):
    """Everything a decode step leaves in the cache: each row's length and keys/values, each Gated DeltaNet
    layer's states and kept per-token states."""
    out = []
    for layer in cache.layers:
        if hasattr(layer, "recurrent"):
            out += [layer.conv, layer.recurrent, *layer.steps[0], *layer.steps[1]]
        else:
            for row, buf in zip(cache.rows, layer.buffers(0)):
                out += [t[:, : row.length] for t in (buf.k, buf.v, getattr(buf, "kd", None), getattr(buf, "vd", None))
                        if t is not None]
    return out + [torch.tensor(cache.lengths)]


@needs_kernels
@pytest.mark.parametrize("quant,kv_cache", [(None, "bf16"), ("int4", "q8_0"), ("int8", "bf16")])
def test_decode_stack_is_the_per_layer_path_bit_for_bit(tiny_dir, quant, kv_cache):
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant=quant, kernels=False)
    report = bind_kernels(model, True)
    assert report.bound.get("decode_stack") == 1 and model.decode_stack is not None, report
    _assert_stack_is_the_per_layer_path(model, kv_cache)


def _assert_stack_is_the_per_layer_path(model, kv_cache):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (n,), generator=gen) for n in (37, 5, 20)]
    calls = []
    stack = model.decode_stack

    def counted(*args):
        out = stack(*args)
        calls.append(out is not None)
        return out

    model.decode_stack = counted
    fast, fast_cache = _run(model, prompts, 3, kv_cache, verify=4)
    # the prompts of 37 and 20 tokens ran per layer, the one of 5 through the stack, as did every step after
    assert calls == [False, True, False, True, True, True, True]
    model.decode_stack = None  # the per-layer loop: each layer's own whole-layer kernel
    slow, slow_cache = _run(model, prompts, 3, kv_cache, verify=4)
    assert torch.equal(fast, slow)
    a, b = _states(fast_cache), _states(slow_cache)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@needs_kernels
def test_decode_stack_leaves_other_calls_to_the_layers(tiny_dir):
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    bind_kernels(model, True)
    stack = model.decode_stack
    cache = model.make_cache()
    with torch.inference_mode():
        assert stack(model.model.embed_tokens(torch.tensor([[1] * 9])), cache, None) is None  # > 8 tokens a row
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        seen = []
        hook = model.model.layers[1].register_forward_hook(lambda *a: seen.append(1))
        model(torch.tensor([[4]]), cache=cache)  # a hooked layer: the per-layer loop runs, and so the hook
        hook.remove()
        assert seen == [1]
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor([[5]]))
    assert stack(x, cache, None) is None  # autograd on: the reference layers
    # bound per op only, or unbound: no stack
    assert "decode_stack" not in bind_kernels(model, True, whole_layers=False).bound and model.decode_stack is None
    bind_kernels(model, False)
    assert model.decode_stack is None


@needs_kernels
def test_decode_stack_names_a_state_count_mismatch(tiny_dir):
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, kernels=False)
    bind_kernels(model, True)
    x = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="one conv and one recurrent state per Gated DeltaNet layer"):
        torch.ops.qwen35.decode_stack(model.decode_stack.plan, x, [], [], x, x, [], [], [], [], [0], [])


@needs_kernels
@pytest.mark.parametrize("stacked", [True, False])
def test_recurrent_state_is_updated_in_place_only_when_nothing_else_holds_it(tiny_dir, stacked):
    """A decode step writes the new recurrent state over the old one (ops/layer_decode.exclusive) unless a snapshot,
    a caller's reference or a view of its memory holds it: those keep the values they had."""
    _in_place_check(tiny_dir, stacked, "decode_stack")


def _in_place_check(tiny_dir, stacked, bound):
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant="int4", kernels=False)
    assert bound in bind_kernels(model, True).bound
    if not stacked:
        model.decode_stack = None
    cache = model.make_cache()
    step = torch.tensor([[7]])
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]), cache=cache)
        model(step, cache=cache)
        states = [layer for layer in cache.layers if hasattr(layer, "recurrent")]
        ptrs = [s.recurrent.data_ptr() for s in states]
        model(step, cache=cache)
        assert [s.recurrent.data_ptr() for s in states] == ptrs  # nothing else held them: in place
        snap = cache.snapshot()
        held = states[1].recurrent
        view = states[2].recurrent[0]
        before = [t.clone() for t in (*(r for _, r in snap.deltanet), held, view)]
        model(step, cache=cache)
        after = [*(r for _, r in snap.deltanet), held, view]
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        assert all(s.recurrent.data_ptr() != p for s, p in zip(states, ptrs))
        del snap, held
        model(step, cache=cache)  # states[2]'s view is still alive: its memory stays as it was
        assert torch.equal(view, before[-1])


@pytest.mark.parametrize("quant,kv_cache", [(None, "bf16"), ("int4", "q8_0"), ("int8", "bf16"), ("int4", "bf16")])
def test_portable_decode_stack_is_its_per_layer_path_bit_for_bit(tiny_dir, quant, kv_cache, without_avx512):
    """Without AVX512 the layers' decode steps run as the portable library's whole-layer calls, the stack as one
    (kernels/portable_layers.cpp): the stack gives the per-layer calls' logits and cache bit for bit, through
    batches of rows at different lengths and a verify pass of several tokens, over a bf16 or a q8_0 cache."""
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant=quant, kernels=False)
    report = bind_kernels(model, True)
    layers = [*model.model.layers, *model.mtp.layers]  # the MTP head's layer whole too
    assert report.bound["portable_gdn_layer"] + report.bound["portable_attn_layer"] == len(layers), report
    assert report.bound.get("portable_decode_stack") == 1 and model.decode_stack.portable, report
    assert "decode_stack" not in report.bound
    _assert_stack_is_the_per_layer_path(model, kv_cache)


@pytest.mark.parametrize("kv_cache", ["bf16", "q8_0"])
def test_portable_layers_decode_as_the_per_op_path_does(tiny_dir, kv_cache, without_avx512):
    """The portable whole-layer decode against the same model bound per op (torch's norms, adds and attention around
    the same portable GEMVs and Gated DeltaNet step): the same greedy tokens, and logits within the bf16 roundings
    that the two orders of the same sums leave."""
    model = qwen35.load_model(tiny_dir, dtype=torch.bfloat16, quant="int8", kernels=False)
    prompts = [torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(3)) for n in (9, 4)]
    bind_kernels(model, True)
    layered, _ = _run(model, prompts, 3, kv_cache, verify=2)
    bind_kernels(model, True, whole_layers=False)
    assert model.decode_stack is None and not any("layer_args" in m.__dict__ for m in model.model.layers)
    per_op, _ = _run(model, prompts, 3, kv_cache, verify=2)
    assert torch.equal(layered.argmax(-1), per_op.argmax(-1))
    err = (layered.float() - per_op.float()).abs().max()
    assert err <= 8 * 2**-8 * per_op.float().abs().max(), err  # 8 bf16 steps of the largest logit (measured: ~3.5)


@pytest.mark.parametrize("stacked", [True, False])
def test_portable_recurrent_state_is_updated_in_place_only_when_nothing_else_holds_it(tiny_dir, stacked,
                                                                                      without_avx512):
    _in_place_check(tiny_dir, stacked, "portable_decode_stack")
