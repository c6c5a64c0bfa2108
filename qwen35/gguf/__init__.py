"""GGUF in and out: load llama.cpp's `qwen35` GGUF files as qwen35 models, and export qwen35 models as GGUF
files llama.cpp loads.

names.py (the name table and layout transforms, both ways), blocks.py (Q8_0/Q4_0 blocks <-> our (qs, d)),
reader.py (files, splits and their errors), metadata.py (hyperparameter keys), vocab.py (tokenizer and
chat template), loader.py (GGUF -> model), writer.py (model -> GGUF), mmproj.py (the vision tower <-> llama.cpp's
separate mmproj GGUF, both ways).
"""

from .loader import load_gguf, read_config
from .mmproj import export_mmproj, load_mmproj, mmproj_path
from .reader import is_gguf, open_gguf
from .writer import EXPORT_TYPES, export_gguf

__all__ = ["EXPORT_TYPES", "export_gguf", "export_mmproj", "is_gguf", "load_gguf", "load_mmproj", "mmproj_path",
           "open_gguf", "read_config"]
