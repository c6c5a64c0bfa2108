"""Quantized weights: layouts (formats.py), the weight object (weight.py), policies (policy.py)."""

from .formats import QuantError
from .policy import POLICIES
from .weight import QuantizedWeight

__all__ = ["QuantError", "QuantizedWeight", "POLICIES"]
