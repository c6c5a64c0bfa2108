"""The engine: greedy == plain forward, batch == single, chunked prefill, snapshots, context policy."""

import pytest
import torch

import qwen35
from qwen35 import ContextLengthError, SamplingParams, batch_generate, generate_step
from qwen35.generation import prefill

GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def model(vlm_replicas):
    return qwen35.load_model(vlm_replicas[3][1])


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def tokens(steps):
    return [s.token for s in steps]


@pytest.mark.parametrize("prompt_len", [1, 5, 64, 130])
def test_greedy_generation_equals_plain_forward(model, prompt_len):
    prompt = torch.randint(0, 320, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    steps = list(generate_step(model, prompt, params=GREEDY, prefill_chunk_size=48))
    assert tokens(steps) == naive_greedy(model, prompt, 10)
    assert [s.finish_reason for s in steps] == [None] * 9 + ["length"]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_prefill_equals_one_pass(model, chunk):
    ids = torch.randint(0, 320, (2, 150), generator=torch.Generator().manual_seed(0))
    full = model(ids)[:, -1]
    cache = model.make_cache(2)
    assert (prefill(model, ids, cache, chunk) - full).abs().max() <= 1e-4
    assert cache.offset == 150


@pytest.mark.parametrize("lengths", [[9], [3, 17], [1, 40, 12]])
def test_batch_equals_single(model, lengths):
    gen = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in lengths]
    batched = batch_generate(model, prompts, GREEDY)
    for prompt, out in zip(prompts, batched):
        assert tokens(out) == tokens(generate_step(model, prompt, params=GREEDY))


def test_sampled_batch_equals_each_alone(model):
    """Each row samples with its own generator (same seed): a batch never changes what a prompt gets."""
    params = SamplingParams(temperature=1.0, top_k=50, seed=7, max_tokens=12)
    prompts = [[5, 6, 7], list(range(20, 60)), [9]]
    for prompt, out in zip(prompts, batch_generate(model, prompts, params)):
        assert tokens(out) == tokens(generate_step(model, prompt, params=params))


def test_rows_leaving_the_batch_leave_the_others_exact(model):
    """Rows finish at different steps (stop ids differ by row through max_tokens=1 prompts) and the rest go
    on exactly as alone."""
    prompts = [[1, 2], list(range(30, 70)), [3, 4, 5, 6]]
    free = [tokens(generate_step(model, p, params=GREEDY)) for p in prompts]
    stop = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(free[0][2],))
    for prompt, out in zip(prompts, batch_generate(model, prompts, stop)):
        assert tokens(out) == tokens(generate_step(model, prompt, params=stop))


def test_snapshot_restore_at_any_position_continues_identically(model):
    prompt = list(range(30, 60))
    cache = model.make_cache()
    expected = tokens(generate_step(model, prompt, cache=cache, params=SamplingParams(temperature=0, max_tokens=12)))
    for cut in (1, 7, 29):
        c = model.make_cache()
        prefill(model, torch.tensor([prompt[:cut]]), c)
        snap = c.snapshot()
        list(generate_step(model, [3, 3, 3], cache=c, params=GREEDY))  # wander off
        c.restore(snap)
        assert tokens(generate_step(model, prompt[cut:], cache=c, params=SamplingParams(temperature=0,
                                                                                       max_tokens=12))) == expected


def test_kv_snapshot_survives_divergence(model):
    """Restore an early snapshot, write different tokens over the shared positions, then restore a later
    snapshot: its tokens must be intact (the write copied the buffer first)."""
    x = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = model.make_cache()
    model(x[:, :10], cache=cache)
    early = cache.snapshot()
    model(x[:, 10:30], cache=cache)
    late = cache.snapshot()
    reference = model(x[:, 30:], cache=cache)
    cache.restore(early)
    model(torch.randint(0, 320, (1, 25)), cache=cache)
    cache.restore(late)
    assert torch.equal(model(x[:, 30:], cache=cache), reference)


def test_stop_tokens_and_max_tokens(model):
    prompt = [4, 5, 6]
    free = tokens(generate_step(model, prompt, params=GREEDY))
    stop_at = free[3]
    steps = list(generate_step(model, prompt, params=SamplingParams(temperature=0, max_tokens=10,
                                                                    stop_token_ids=(stop_at,))))
    first = free.index(stop_at)
    assert tokens(steps) == free[: first + 1] and steps[-1].finish_reason == "stop"
    assert len(list(generate_step(model, prompt, params=SamplingParams(temperature=0, max_tokens=1)))) == 1


def test_context_limit_is_a_clear_error_and_leaves_the_cache_alone(model):
    limit = model.config.max_position_embeddings
    cache = model.make_cache()
    prefill(model, torch.tensor([[1, 2, 3]]), cache)
    snap_offset = cache.offset
    with pytest.raises(ContextLengthError, match=rf"prompt \(2 tokens after 3 cached\) \+ max_tokens \({limit - 4}\) = "
                                                 rf"{limit + 1} exceeds the context of {limit} tokens"):
        next(generate_step(model, [4, 5], cache=cache, params=SamplingParams(max_tokens=limit - 4)))
    assert cache.offset == snap_offset
    with pytest.raises(ContextLengthError):
        batch_generate(model, [[1], [2] * 5], SamplingParams(max_tokens=limit - 2))


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        next(generate_step(model, []))
    with pytest.raises(ValueError, match="one sequence"):
        next(generate_step(model, [1], cache=model.make_cache(2)))


def test_a_tokenizer_past_the_models_vocabulary_is_named(chat_model_dir):
    """A text prompt whose tokens fall outside the model's vocabulary blames the tokenizer (a tokenizer.json
    copied beside another model's config.json), not the caller's token ids, as a clear InputError."""
    from dataclasses import replace

    _, tok = qwen35.load(chat_model_dir, dtype=torch.float32)
    small = qwen35.Qwen35ForCausalLM(replace(qwen35.ModelConfig.from_file(chat_model_dir / "config.json"), vocab_size=100))
    with pytest.raises(qwen35.InputError, match=r"the tokenizer gave token id \d+, outside the model's "
                                                r"vocabulary \[0, 100\): the tokenizer does not belong"):
        qwen35.generate(small, tok, "def read_lines(path): configuration dictionary")
    with pytest.raises(qwen35.InputError, match=r"token id 150 is outside the vocabulary \[0, 100\)"):
        qwen35.generate(small, tok, [1, 150])
