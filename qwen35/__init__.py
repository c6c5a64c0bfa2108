"""qwen35: run, chat with, serve and train Qwen3.5 models.

Public API:
    model = qwen35.load_model(path, dtype=torch.float32)
    logits = model(input_ids)                      # [B, T] -> [B, T, vocab] (fp32)
    cache = model.make_cache(batch_size=1)
    logits = model(input_ids, cache=cache)         # continues from the cache
"""

from .cache import HybridCache
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, Qwen35Error
from .model.qwen35 import InputError, Qwen35ForCausalLM
from .weights import load_model

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "ModelConfig",
    "Qwen35ForCausalLM",
    "HybridCache",
    "Qwen35Error",
    "ConfigError",
    "CheckpointError",
    "InputError",
]
