"""The quantized ONNX graphs (`qwen35 export-onnx --quant int8 / int4`): a graph's constant MatMuls rewritten
into onnxruntime's MatMulNBits, and its embedding lookup into a Gather of quantized rows (the head's blocks for
a tied model, q8_0 blocks of its own for an untied one), so no fp32 vocabulary table stays in a quantized export.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

IR_VERSION = 10  # onnxruntime-web 1.31 refuses newer IR versions than it knows
# MatMulNBits accuracy_level 4: activations rounded to int8 per block inside the kernel, as qwen35's own q8_0 /
# q4_0 kernels do. Measured on the bundled model (onnxruntime CPU, 2 threads): int8 decode 94 tok/s at level
# 4 against 21 at level 0 (exact fp32 activations), whose 8-bit path is slower than fp32 weights (64).
ACCURACY_LEVEL = 4


def quantize(proto, bits: int, gate_columns: int, accuracy_level: int | None = None, tied: bool = False):
    """Every MatMul with a constant weight becomes MatMulNBits (symmetric, blocks of 32), except the Gated
    DeltaNet gate projections in_proj_a / in_proj_b: Hv columns each, so tiny, and the decay they feed
    compounds error along the whole sequence (qwen35's own policies keep them at 8 bits or more). They are
    found by their width, `gate_columns` = Hv: the exporter renames the transposed weights (val_N), and no
    other projection is that narrow. accuracy_level: MatMulNBits' (default ACCURACY_LEVEL; 0 keeps fp32
    activations, exact but slow). tied: the embedding table is the head's matrix, so the lookup then reads
    the head's quantized blocks (`_embedding_from_head`) and the fp32 table leaves the graph; an untied table
    becomes 8-bit blocks of its own (`_embedding_blocks`). Rewrites `proto` (pass a copy to keep it)."""
    # Importing the quantizer calls logging.basicConfig(level=INFO): every library's INFO lines (a line per
    # node from the quantizer itself) would reach the user's terminal. Undo that side effect.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, level
    if tied:
        _constant_head(proto)
    widths = {t.name: t.dims[-1] for t in proto.graph.initializer if len(t.dims) == 2}
    keep = {n.name for n in proto.graph.node if n.op_type == "MatMul" and widths.get(n.input[1]) == gate_columns}
    q = MatMulNBitsQuantizer(proto, bits=bits, block_size=32, is_symmetric=True, nodes_to_exclude=sorted(keep),
                             op_types_to_quantize=("MatMul",),
                             accuracy_level=ACCURACY_LEVEL if accuracy_level is None else accuracy_level)
    q.process()
    out = q.model.model
    out.ir_version = min(out.ir_version, IR_VERSION)
    if tied:
        _embedding_from_head(out, bits)
    else:
        _embedding_blocks(out)
    return out


def _constant_head(proto) -> None:
    """A tied model's head reaches the exporter as MatMul(h, Transpose(embedding table)): the table also feeds
    the lookup, so the transpose is not folded, and a MatMul whose weight is computed is one the quantizer
    skips (the 0.8B's int8 export had kept its 248,320 x 1024 head in fp32, read whole every token). Give that
    MatMul the transposed table as a constant of its own, which the quantizer then rewrites."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    for node in [n for n in g.node if n.op_type == "MatMul"]:
        t = made.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits or len(inits[t.input[0]].dims) != 2:
            continue
        perm = {a.name: helper.get_attribute_value(a) for a in t.attribute}.get("perm", [1, 0])
        table = numpy_helper.to_array(inits[t.input[0]])
        name = f"{t.input[0]}__transposed"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.transpose(perm)), name))
        node.input[1] = name
        if not any(t.output[0] in n.input for n in g.node):
            g.node.remove(t)


def _lookup(g):
    """The graph's embedding lookup (the one Gather reading a 2-D initializer) and its table, or (None, None)."""
    inits = {t.name: t for t in g.initializer}
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    return (gathers[0], inits[gathers[0].input[0]]) if len(gathers) == 1 else (None, None)


def _embedding_from_head(proto, bits: int) -> None:
    """A tied model's embedding lookup rewritten to read the head's MatMulNBits blocks: the token's embedding
    is then exactly the head's dequantized row, as in qwen35's own quantized models, where one quantized matrix
    serves both; the fp32 table (V x H x 4 bytes: 970 MiB of a 0.8B export's 1508) is dropped. Left as is where
    the graph has no such lookup or head."""
    from onnx import helper

    g = proto.graph
    gather, table = _lookup(g)
    if gather is None:
        return
    V, H = table.dims
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}
    heads = [n for n in g.node if n.op_type == "MatMulNBits" and attrs(n)["N"] == V and attrs(n)["K"] == H
             and attrs(n)["block_size"] == 32 and len(n.input) == 3 and H % 32 == 0]
    if len(heads) == 1:
        _gather_blocks(g, gather, heads[0].input[1], heads[0].input[2], H, bits)


EMBEDDING_BITS = 8  # an untied table's blocks: a lookup reads a few rows a token, so bits cost file and memory only
EMBEDDING_BAND = 16384  # rows quantized at a time (the 9B's fp32 table is 3.8 GiB; its temporaries stay small)


def _embedding_blocks(proto) -> None:
    """An untied model's embedding table (the 9B's 248,320 x 4,096: 3.8 GiB in fp32, most of a 4-bit export)
    stored as q8_0 blocks in MatMulNBits' unsigned form (uint8 q + 128 [V, H/32, 32], fp16 scales [V, H/32]:
    qwen35's q8_0 rounding, so a row dequantizes to qwen35's q8_0 row exactly), which the lookup dequantizes for
    the gathered rows only: 1.06 bytes a weight instead of 4, in 8 bits whatever the matrices' bits, since the
    table is never streamed. Left as is where the graph has no lookup or H is not whole blocks."""
    from onnx import numpy_helper

    from ..quant.formats import BLOCK, quantize_q8_0

    g = proto.graph
    gather, table = _lookup(g)
    if gather is None or table.dims[1] % BLOCK or any(table.name in n.input for n in g.node if n is not gather):
        return
    w = numpy_helper.to_array(table)
    V, H = w.shape
    blocks, scales = np.empty((V, H // BLOCK, BLOCK), np.uint8), np.empty((V, H // BLOCK), np.float16)
    for s in range(0, V, EMBEDDING_BAND):
        qs, d = quantize_q8_0(torch.from_numpy(np.array(w[s : s + EMBEDDING_BAND])))  # a writable copy
        blocks[s : s + EMBEDDING_BAND] = (qs.numpy().astype(np.int16) + 128).astype(np.uint8).reshape(-1, H // BLOCK, BLOCK)
        scales[s : s + EMBEDDING_BAND] = d.numpy()
    del w
    name = f"{table.name}__q8_0"
    g.initializer.extend([numpy_helper.from_array(blocks, name + "_blocks"), numpy_helper.from_array(scales, name + "_scales")])
    _gather_blocks(g, gather, name + "_blocks", name + "_scales", H, EMBEDDING_BITS)


def _gather_blocks(g, gather, blocks: str, scales: str, H: int, bits: int) -> None:
    """Replace `gather` (ids -> rows of an fp32 table) by a lookup of quantized rows: Gather the token's rows of
    blocks ([V, H/32, 32] uint8, or [V, H/32, 16] for 4 bits, low nibble first) and of scales [V, H/32], unpack,
    subtract the zero point 2^(bits-1), scale. Plain ONNX ops (Gather, BitwiseAnd, BitShift, Cast, Sub, Mul,
    Reshape), which onnxruntime-web's WASM build runs. The fp32 table leaves the graph once nothing reads it."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in g.initializer}
    ids, out = gather.input[1], gather.output[0]
    nb = H // 32
    p = f"{out}__dequantized_"

    def const(name, value):
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), p + name))
        return p + name

    last = const("last", [-1])
    nodes = [helper.make_node("Gather", [blocks, ids], [p + "q"], axis=0)]  # [B, T, nb, 32 or 16] uint8
    q = p + "q"
    if bits == 4:
        g.initializer.append(numpy_helper.from_array(np.array(15, np.uint8), p + "mask"))
        g.initializer.append(numpy_helper.from_array(np.array(4, np.uint8), p + "four"))
        nodes += [helper.make_node("BitwiseAnd", [q, p + "mask"], [p + "lo"]),
                  helper.make_node("BitShift", [q, p + "four"], [p + "hi"], direction="RIGHT"),
                  helper.make_node("Unsqueeze", [p + "lo", last], [p + "lo1"]),
                  helper.make_node("Unsqueeze", [p + "hi", last], [p + "hi1"]),
                  helper.make_node("Concat", [p + "lo1", p + "hi1"], [p + "pairs"], axis=-1),
                  helper.make_node("Reshape", [p + "pairs", const("blocks", [0, 0, nb, 32])], [p + "q32"])]
        q = p + "q32"
    zero = np.array(2 ** (bits - 1), np.float32)
    g.initializer.append(numpy_helper.from_array(zero, p + "zero"))
    nodes += [helper.make_node("Cast", [q], [p + "qf"], to=TensorProto.FLOAT),
              helper.make_node("Sub", [p + "qf", p + "zero"], [p + "centred"]),
              helper.make_node("Gather", [scales, ids], [p + "s"], axis=0),  # [B, T, nb]
              helper.make_node("Cast", [p + "s"], [p + "sf"], to=TensorProto.FLOAT),
              helper.make_node("Unsqueeze", [p + "sf", last], [p + "s1"]),
              helper.make_node("Mul", [p + "centred", p + "s1"], [p + "rows"]),
              helper.make_node("Reshape", [p + "rows", const("hidden", [0, 0, H])], [out])]
    at = list(g.node).index(gather)
    g.node.remove(gather)
    for i, n in enumerate(nodes):
        g.node.insert(at + i, n)
    table = gather.input[0]
    if not any(table in n.input for n in g.node):
        g.initializer.remove(inits[table])
