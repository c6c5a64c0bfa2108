"""qwen35: run, chat with, serve and train Qwen3.5 models.

Public API:
    model = qwen35.load_model(path, dtype=torch.float32)
    logits = model(input_ids)                      # [B, T] -> [B, T, vocab] (fp32)
    cache = model.make_cache(batch_size=1)
    logits = model(input_ids, cache=cache)         # continues from the cache
    for step in qwen35.generate_step(model, prompt_ids, params=qwen35.SamplingParams(temperature=0)):
        step.token, step.logprob, step.finish_reason
"""

from .api import generate, load, stream_generate
from .cache import CacheError, HybridCache
from .generation import ContextLengthError, Response, StepOutput, batch_generate, generate_step
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, Qwen35Error
from .model.qwen35 import InputError, Qwen35ForCausalLM
from .ops.fast import bind_kernels, kernel_policy
from .runtime import set_threads
from .sampling import Sampler, SamplingError, SamplingParams
from .speculation import Speculation, SpeculativeError
from .weights import load_model

__version__ = "0.1.0"

__all__ = [
    "load",
    "load_model",
    "generate",
    "stream_generate",
    "Response",
    "ModelConfig",
    "Qwen35ForCausalLM",
    "HybridCache",
    "CacheError",
    "Qwen35Error",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "generate_step",
    "batch_generate",
    "StepOutput",
    "SamplingParams",
    "Sampler",
    "SamplingError",
    "Speculation",
    "SpeculativeError",
    "ContextLengthError",
    "set_threads",
    "bind_kernels",
    "kernel_policy",
]
