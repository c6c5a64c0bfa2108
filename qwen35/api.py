"""Text-level API: `load`, `stream_generate`, `generate`.

`load` resolves a local directory or a Hugging Face repo id (through huggingface_hub's cache; with
HF_HUB_OFFLINE=1 only what is cached, and a clear message when it is not). `stream_generate` turns
`generate_step` ids into Response objects (text delta, token, logprobs, finish_reason, timings), the one
shape the CLI, the server and benchmarks all read; `generate` joins the text.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import HybridCache
from .chat import ChatTemplate
from .errors import CheckpointError
from .generate import DEFAULT_PREFILL_CHUNK, generate_step
from .prompt_cache import PromptCache
from .runtime import peak_rss_mb
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import load_model


@dataclass
class Response:
    text: str  # the new text since the previous response (complete UTF-8 only)
    token: int
    logprob: float | None
    top_logprobs: tuple | None
    finish_reason: str | None  # None, "stop" or "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens restored from a snapshot instead of prefilled
    generation_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float


def resolve(path_or_repo_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub repo id resolved to its cached snapshot."""
    p = Path(path_or_repo_id).expanduser()
    if p.exists():
        return p
    repo = str(path_or_repo_id)
    if repo.count("/") != 1 or repo.startswith((".", "/")):
        raise CheckpointError(f"checkpoint not found: {p} (not a directory, and not a hub repo id like 'Qwen/Qwen3.5-0.8B')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo, local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"'{repo}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once with "
            f"network access (`huggingface-cli download {repo}`) or point at a local directory") from None
    except Exception as e:  # noqa: BLE001 - network and hub errors all mean: cannot get the weights
        raise CheckpointError(f"could not fetch '{repo}' from the Hugging Face hub: {e}") from None


def load(path_or_repo_id: str | Path, dtype: torch.dtype = torch.bfloat16, progress: bool = False):
    """(model, tokenizer) from a directory or hub repo id. The tokenizer carries the chat template."""
    path = resolve(path_or_repo_id)
    model = load_model(path, dtype=dtype, progress=progress)
    tokenizer = Tokenizer(path)
    tokenizer.chat_template = ChatTemplate.from_model_dir(path)
    # The model and tokenizer live as long as the process: move them (and everything imported so far) out of
    # the cyclic collector's view, so its full passes during decode no longer walk thousands of modules.
    gc.collect()
    gc.freeze()
    return model, tokenizer


def stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    params: SamplingParams | None = None,
    cache: HybridCache | None = None,
    prompt_cache: PromptCache | None = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    sampler=None,
) -> Iterator[Response]:
    """Yield a Response per generated token. `prompt` is text (encoded as is, no BOS) or token ids.

    With `prompt_cache`, the longest snapshotted prefix of the prompt is restored and only the rest is
    prefilled; the prompt's own end is snapshotted for next time. Stop ids default to the tokenizer's
    end-of-turn ids.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    params = params or SamplingParams()
    if not params.stop_token_ids:
        from dataclasses import replace

        params = replace(params, stop_token_ids=tuple(tokenizer.eos_token_ids))
    cached = 0
    if prompt_cache is not None and cache is None:
        cache, cached = prompt_cache.lookup(ids)
    if cache is None:
        cache = model.make_cache(batch_size=1)
    feed = ids[cached:]
    detok = tokenizer.detokenizer()
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for step in generate_step(model, feed, cache=cache, params=params, prefill_chunk_size=prefill_chunk_size,
                              sampler=sampler):
        n += 1
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            if prompt_cache is not None:
                # the cache now holds exactly the prompt (the first token is not fed yet)
                prompt_cache.store(ids, cache)
        text = detok.add(step.token)
        if step.finish_reason is not None:
            text += detok.finalize()
        yield Response(
            text=text, token=step.token, logprob=step.logprob, top_logprobs=step.top_logprobs,
            finish_reason=step.finish_reason, prompt_tokens=len(ids), cached_tokens=cached, generation_tokens=n,
            prefill_tok_s=len(feed) / max(t_first - t0, 1e-9),
            decode_tok_s=(n - 1) / (now - t_first) if n > 1 else 0.0, peak_rss_mb=peak_rss_mb(),
        )


def generate(model, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> str:
    """The generated text (the stop token's own text excluded when it is a special token)."""
    out = []
    for r in stream_generate(model, tokenizer, prompt, params, **kw):
        if tokenizer.ends_turn_silently(r.token, r.finish_reason):
            break
        out.append(r.text)
    return "".join(out)
