"""Text-level API: `load`, `stream_generate`, `generate`.

`load` resolves a local directory or a Hugging Face repo id (through huggingface_hub's cache; with
HF_HUB_OFFLINE=1 only what is cached, and a clear message when it is not). `stream_generate` fills in the
text and timings of `generate_step`'s Response records (the one shape the CLI, the server and benchmarks
all read); `generate` joins the text.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from .cache import HybridCache
from .chat_template import ChatTemplate
from .config import ModelConfig
from .errors import CheckpointError
from .generation import DEFAULT_PREFILL_CHUNK, Response, as_ids, generate_step
from .model.qwen35 import InputError
from .prompt_cache import PromptCache
from .runtime import peak_rss_mb
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import load_model


def resolve(path_or_repo_id: str | Path) -> Path:
    """A local checkpoint directory, or a hub repo id resolved to its cached snapshot."""
    p = Path(path_or_repo_id).expanduser()
    if p.exists():
        return p
    repo = str(path_or_repo_id)
    if repo.count("/") != 1 or repo.startswith((".", "/")):
        raise CheckpointError(f"checkpoint not found: {p} (not a directory, and not a hub repo id like 'Qwen/Qwen3.5-0.8B')")
    if p.parent.is_dir() and p.parent != Path("."):  # 'out/run1' beside a local 'out': a path with a typo, not a
        # hub id (looking it up would take a network round trip and then blame the hub)
        raise CheckpointError(f"checkpoint not found: {p} ({p.parent} is a local folder without it; a hub repo id "
                              f"is read only where no such folder exists)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo, local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except LocalEntryNotFoundError:  # offline, or the hub unreachable and nothing cached
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"'{repo}' is not in the local Hugging Face cache and {why}; download it once with network access "
            f"(`huggingface-cli download {repo}`), or point at a local directory (none is at {p})") from None
    except Exception as e:  # noqa: BLE001 - network and hub errors all mean: cannot get the weights
        raise CheckpointError(f"could not fetch '{repo}' from the Hugging Face hub: {e}") from None


def load(path_or_repo_id: str | Path, dtype: torch.dtype = torch.bfloat16, progress: bool = False,
         kernels: bool | None = None, quant: str | None = None, kv_cache: str = "bf16",
         mmproj: str | Path | Literal[False] | None = None):
    """(model, tokenizer) from a directory, a GGUF file or a hub repo id. The tokenizer carries the chat template.
    kernels, quant, kv_cache, mmproj: as in `load_model` (kernels None: ops.fast.kernel_policy decides; mmproj:
    a llama.cpp mmproj GGUF whose vision tower the model gets; None: a GGUF's `mmproj-<stem>.gguf` beside it,
    where there is one; False: none)."""
    from .gguf.reader import is_gguf_path
    path = resolve(path_or_repo_id)
    # a missing or broken tokenizer is said before the weights load (a 9B: minutes), after the config's own
    # errors (a wrong directory is named by its config, a GGUF of another architecture by its metadata)
    if is_gguf_path(path):  # the tokenizer and template live in the GGUF's metadata
        from .gguf import open_gguf
        from .gguf.metadata import config_dict
        from .gguf.vocab import chat_template

        f = open_gguf(path)  # once for config and tokenizer (its 250k-token vocabulary takes a moment to parse)
        ModelConfig.from_hf(config_dict(f), source=str(f.path))
        tokenizer = Tokenizer.from_gguf(f)
        tmpl = chat_template(f)
        tokenizer.chat_template = (ChatTemplate(tmpl, f"{path} (tokenizer.chat_template)") if tmpl
                                   else ChatTemplate.from_model_dir(None))
        del f  # its maps: load_model opens the file itself
    else:
        from .checkpoint_index import check_not_adapters

        check_not_adapters(path)  # a LoRA output folder: name what to load, not only "config.json not found"
        ModelConfig.from_file(path)
        tokenizer = Tokenizer(path)
        tokenizer.chat_template = ChatTemplate.from_model_dir(path)
    model = load_model(path, dtype=dtype, progress=progress, kernels=kernels, quant=quant, kv_cache=kv_cache,
                       mmproj=mmproj)
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
    speculative=None,
    images=None,
    videos=None,
) -> Iterator[Response]:
    """Yield a Response per generated token, with its text delta (the stop token's own text excluded when
    it is a control token) and timings. `prompt` is text (encoded as is, no BOS) or token ids.

    images: the prompt's images in order (PIL images, file paths, bytes or data: URLs), one per
    `<|vision_start|><|image_pad|><|vision_end|>` the chat template wrote for an {"type": "image"} content
    part. videos: likewise for {"type": "video"} parts: video_input.Video (frames + rate) or an animated
    GIF/WebP/PNG file. A checkpoint without a vision tower raises ImageError ("no vision tower").

    cache: continue from this cache (it must not be combined with prompt_cache). With `prompt_cache`, the
    longest snapshotted prefix of the prompt is restored and only the rest is prefilled; the prompt's own
    end is snapshotted for next time. Stop ids default to the tokenizer's end-of-turn ids.
    speculative: a speculative.Speculation (drafts from the MTP head; its `.last` holds this call's stats).
    """
    if cache is not None and prompt_cache is not None:  # checked here, at the call, not at the first token
        raise ValueError("stream_generate takes cache= or prompt_cache=, not both: a prompt cache restores into "
                         "a cache of its own")
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        if ids and max(ids) >= model.config.vocab_size:  # (the token-id path below would blame the caller)
            raise InputError(f"the tokenizer gave token id {max(ids)}, outside the model's vocabulary [0, "
                              f"{model.config.vocab_size}): the tokenizer does not belong to this model "
                              "(its tokenizer.json and config.json's vocab_size disagree)")
    else:
        ids = as_ids(prompt, model.config.vocab_size)
    params = (params or SamplingParams()).with_stops(tokenizer.eos_token_ids)
    key, inputs = ids, None
    if not (images or videos):
        from .multimodal import check_no_placeholders

        check_no_placeholders(model, ids)
    else:  # decoded and checked here, at the call, not at the first token
        from .multimodal import prepare_prompt

        ids, inputs, key = prepare_prompt(model, ids, images or [], videos=videos or [],
                                          encode=lambda t: tokenizer.encode(t))
    return _stream(model, tokenizer, ids, params, cache, prompt_cache, prefill_chunk_size, sampler, speculative,
                   inputs, key)


def _stream(model, tokenizer, ids, params, cache, prompt_cache, prefill_chunk_size, sampler,
            speculative, images=None, key=None) -> Iterator[Response]:
    cached = 0
    key = ids if key is None else key  # what prompt reuse matches: image pads stand for their content hash
    if prompt_cache is not None:
        cache, cached = prompt_cache.lookup(key)
    if cache is None:
        cache = model.make_cache(batch_size=1)
    feed = ids[cached:]
    vision = None
    if images is not None:
        from .multimodal import VisionPrompt

        vision = VisionPrompt.build(model, ids, images, cached)
    text = tokenizer.text_stream()
    t0 = time.perf_counter()
    t_first = None
    from .guide import make_guide

    guide = make_guide(params, tokenizer, model.config.vocab_size)
    for r in generate_step(model, feed, cache=cache, params=params, prefill_chunk_size=prefill_chunk_size,
                           sampler=sampler, guide=guide, speculative=speculative, vision=vision):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            if prompt_cache is not None:
                # the cache now holds exactly the prompt (the first token is not fed yet)
                prompt_cache.store(key, cache)
        n = r.generation_tokens
        yield replace(r, text=text.add(r.token, r.finish_reason), prompt_tokens=len(ids), cached_tokens=cached,
                      prefill_tok_s=len(feed) / max(t_first - t0, 1e-9),
                      decode_tok_s=(n - 1) / (now - t_first) if n > 1 else 0.0, peak_rss_mb=peak_rss_mb())


def generate(model, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> str:
    """The generated text (the stop token's own text excluded when it is a control token)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, params, **kw))
