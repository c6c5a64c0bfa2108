"""The Qwen3.5 model: one module per part, wired together in qwen35.py."""
