"""The exceptions qwen35 raises for bad input. Every message names the file, key or tensor at fault."""


class Qwen35Error(Exception):
    """Base class: catch this to handle any problem qwen35 reports about its input."""


class ConfigError(Qwen35Error):
    """config.json is missing, unreadable, or describes a model qwen35 cannot run."""


class CheckpointError(Qwen35Error):
    """Weights are missing, corrupt, truncated, or do not fit the configuration."""


class SamplingError(Qwen35Error, ValueError):
    """A sampling parameter is out of range, or logits that cannot be sampled (NaN, infinite, every token
    masked); the message names it."""
