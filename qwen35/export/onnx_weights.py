"""An export's weights, made while they are written: never the whole model in memory.

The graphs are traced on placeholders (onnx.py's `export_graph`); each weight initializer of the written graph
is a recipe (`Param`, `Blocks`, `Scales`) over one parameter of a source (`checkpoint_index.CheckpointTensors`: the
checkpoint's files, read a band of rows at a time; `ModelWeights`: a loaded model; both give `config`, `shapes`,
`rows(name, a, b)` and `close()`), computed when the graph writer reaches
it and written in bands of rows. Peak memory is then one band (or one transposed matrix) whatever the size of
the model: the 0.8B's int4 export had peaked at 11.5 GiB when the fp32 model, the exporter's copy of every
weight and the quantizer's copy were all in memory at once, which put a 4B or 9B export out of any laptop's
reach.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import Qwen35Error
from .onnx_graph import TAP, TRANSPOSED, transform

BAND_BYTES = 64 << 20  # fp32 rows read and converted at a time


@dataclass(frozen=True)
class Param:
    """A parameter in fp32, as `onnx_graph.transform(suffix)` makes it (suffix "" is the parameter itself)."""

    param: str
    suffix: str = ""

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.suffix == TRANSPOSED:
            return shape[::-1]
        if self.suffix.startswith(TAP):
            return shape[:1]
        return shape


@dataclass(frozen=True)
class Blocks:
    """A matrix [N, K] as symmetric blocks of 32 along K in MatMulNBits' layout: uint8 [N, K/32, 32 * bits / 8]
    (value + 2^(bits-1); 4 bits: element 2j in the low nibble of byte j). The values are qwen35's own q8_0 /
    q4_0 quantization of the parameter (`quant.formats`), so the graph's weights are qwen35's, bit for bit."""

    param: str
    bits: int


@dataclass(frozen=True)
class Scales:
    """The scale of each block of `Blocks(param, bits)`, [N, K/32] in `dtype` ("float32" for MatMulNBits,
    "float16" for an embedding lookup's table)."""

    param: str
    bits: int
    dtype: str = "float32"


Recipe = Param | Blocks | Scales


class ModelWeights:
    """The parameters of a loaded model (fp32, bf16 or fp16; not quantized)."""

    def __init__(self, model):
        self.config = model.config
        self.params = dict(model.named_parameters())
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        for name, module in model.named_modules():  # quantized weights are objects, not parameters
            w = getattr(module, "weight", None)
            if w is not None and not isinstance(w, torch.Tensor):
                raise ExportSourceError(f"{name}.weight is quantized ({type(w).__name__}): export a model loaded "
                                        "without quant= (export-onnx --quant quantizes for the graph)")

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        return self.params[name].detach()[a:b]

    def close(self) -> None:
        pass


class ExportSourceError(Qwen35Error):
    """The weights given to an export cannot be exported."""


def shape_of(recipe: Recipe, source) -> tuple[int, ...]:
    shape = source.shapes[recipe.param]
    if isinstance(recipe, Param):
        return recipe.shape(shape)
    N, K = shape
    if isinstance(recipe, Blocks):
        return (N, K // 32, 32 * recipe.bits // 8)
    return (N, K // 32)


class Maker:
    """Streams each recipe's bytes from `source`. A Blocks recipe keeps the scales it computed until its
    Scales recipe asks (the writer writes them one after the other), so a matrix is quantized once."""

    def __init__(self, source):
        self.source = source
        self.scales: dict[tuple[str, int], list[torch.Tensor]] = {}

    def chunks(self, recipe: Recipe) -> Iterator[np.ndarray]:
        if isinstance(recipe, Param):
            yield from self._param(recipe)
        elif isinstance(recipe, Blocks):
            kept = self.scales[(recipe.param, recipe.bits)] = []
            for q, d in self._quantized(recipe.param, recipe.bits):
                kept.append(d)
                yield q.numpy()
        else:
            kept = self.scales.pop((recipe.param, recipe.bits), None)
            bands = kept if kept is not None else (d for _, d in self._quantized(recipe.param, recipe.bits))
            for d in bands:
                yield d.numpy().astype(recipe.dtype)

    def _bands(self, name: str) -> Iterator[tuple[int, int]]:
        shape = self.source.shapes[name]
        rows = max(1, BAND_BYTES // (4 * max(1, int(np.prod(shape[1:])))))
        for a in range(0, shape[0], rows):
            yield a, min(shape[0], a + rows)

    def _param(self, r: Param) -> Iterator[np.ndarray]:
        shape = self.source.shapes[r.param]
        if r.suffix == "" and len(shape) == 2:  # rows as they are: band by band (the 9B's table is 4 GB in fp32)
            for a, b in self._bands(r.param):
                yield self.source.rows(r.param, a, b).float().numpy()
        else:  # a transpose needs the whole matrix: at most a projection's (the head's only in a fp32 export)
            yield transform(self.source.rows(r.param, 0, shape[0]), r.suffix).numpy()

    def _quantized(self, name: str, bits: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(blocks in MatMulNBits' layout, fp32 scales [rows, K/32]) band by band."""
        from ..quant.formats import quantize_fast

        for a, b in self._bands(name):
            w = self.source.rows(name, a, b).float()
            N, K = w.shape
            qs, d = quantize_fast("q8_0" if bits == 8 else "q4_0", w)
            if bits == 8:  # int8 -> uint8 value + 128: flipping the sign bit of two's complement adds 128
                q = (qs.view(torch.uint8) ^ 0x80).reshape(N, K // 32, 32)
            else:  # q4_0 (GGUF): byte j of a block holds elements j and j + 16; MatMulNBits: 2j and 2j + 1
                packed = qs.reshape(N, K // 32, 16)
                v = torch.cat([packed & 0x0F, packed >> 4], dim=-1)
                q = v[..., 0::2] | (v[..., 1::2] << 4)
            yield q.contiguous(), d.float()
