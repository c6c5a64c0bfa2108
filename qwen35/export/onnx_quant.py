"""The quantized ONNX graphs (`qwen35 export-onnx --quant int8 / int4`): a graph's MatMuls on weights rewritten
into onnxruntime's MatMulNBits, and its embedding lookup into a Gather of quantized rows (the head's blocks for
a tied model, q8_0 blocks of its own for an untied one), so no fp32 vocabulary table stays in a quantized export.
The weights stay deferred (onnx.py): this rewrites the graph and names the recipes (onnx_weights.py) that make
the new initializers when they are written.
"""

from __future__ import annotations

import numpy as np

IR_VERSION = 10  # onnxruntime-web 1.31 refuses newer IR versions than it knows
# MatMulNBits accuracy_level 4: activations rounded to int8 per block inside the kernel, as qwen35's own q8_0 /
# q4_0 kernels do. Measured on the bundled model (onnxruntime CPU, 2 threads): int8 decode 94 tok/s at level
# 4 against 21 at level 0 (exact fp32 activations), whose 8-bit path is slower than fp32 weights (64).
ACCURACY_LEVEL = 4
GATES = ("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight")


# --quant -> the bits of a matrix (parameter name, [N, K], tied, decoder depth): the layouts MatMulNBits holds
# exactly (qwen35's q8_0 / q4_0) everywhere, and the policies. MatMulNBits has no K-quant layout, so ONNX's int4 is
# qwen35's int4 mix in the two layouts it has: q8_0 where that gives a matrix more than 4 bits (the head, and
# so the tied lookup that reads its blocks; every attention v_proj; the Gated DeltaNet in_proj_qkv / in_proj_z /
# out_proj of the layers llama.cpp's Q4_K_M gives more bits), q4_0 elsewhere. Measured on the bundled model
# (benchmarks/bench_onnx_quality.py, held-out text, KL / greedy agreement / weights): q4_0 everywhere 0.0176 /
# 0.893 / 5.8 MiB, the head alone in q8_0 0.0053 / 0.939 / 6.8, int4 0.0023 / 0.960 / 7.2.
def _int4_bits(param: str, shape: tuple[int, int], tied: bool, num_layers: int) -> int:
    """8 bits where qwen35's int4 gives a matrix more than 4 (`quant.policy`), 4 elsewhere."""
    from ..quant.policy import scheme_for

    return 4 if scheme_for("int4", param, shape, tied, num_layers) in ("q4_k", "q4_0") else 8


POLICIES = {"int8": lambda *_: 8, "int4": _int4_bits, "q8_0": lambda *_: 8, "q4_0": lambda *_: 4}


def quantize(proto, recipes: dict, shapes: dict[str, tuple[int, ...]], quant: str, accuracy_level: int | None = None,
             tied: bool = False) -> None:
    """Every MatMul on a weight (a transposed parameter: `onnx_graph.TRANSPOSED`) becomes MatMulNBits
    (symmetric blocks of 32 in the bits `POLICIES[quant]` gives it: qwen35's q8_0 / q4_0 of the parameter,
    `onnx_weights.Blocks`), except the Gated DeltaNet gate projections in_proj_a / in_proj_b: Hv columns
    each, so tiny, and the decay they feed compounds error along the whole sequence (qwen35's own policies
    keep them at 8 bits or more), and any matrix whose input dimension is not whole blocks. accuracy_level:
    MatMulNBits' (default ACCURACY_LEVEL; 0 keeps fp32 activations, exact but slow). tied: the embedding table is the head's matrix, so the lookup
    then reads the head's blocks (`_embedding_from_head`) and the fp32 table leaves the graph; an untied table
    becomes 8-bit blocks of its own (`_embedding_blocks`). Rewrites `proto`, adding the recipes and shapes of
    the initializers it makes to `recipes` and `shapes`."""
    from onnx import helper

    from ..quant.policy import num_layers_of
    from .onnx_graph import MS_DOMAIN, TRANSPOSED
    from .onnx_weights import Blocks, Param, Scales

    g = proto.graph
    level = ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    num_layers = num_layers_of(shapes)  # the graph's names keep the parameters' "model.layers.N." prefix
    have = {t.name for t in g.initializer}
    for at, node in enumerate(list(g.node)):
        r = recipes.get(node.input[1]) if node.op_type == "MatMul" and node.input[1] in have else None
        if not (isinstance(r, Param) and r.suffix == TRANSPOSED) or r.param.endswith(GATES):
            continue
        K, N = shapes[node.input[1]]
        if K % 32:
            continue
        bits = POLICIES[quant](r.param, (N, K), tied, num_layers)
        blocks, scales = f"{r.param}__q{bits}", f"{r.param}__q{bits}_scales"
        made = {blocks: (Blocks(r.param, bits), (N, K // 32, 32 * bits // 8), "uint8"),
                scales: (Scales(r.param, bits), (N, K // 32), "float32")}
        for name, (recipe, shape, dtype) in made.items():  # blocks then scales, side by side: the writer
            if name not in have:  # quantizes the matrix once for both
                _add(g, recipes, shapes, name, recipe, shape, dtype)
                have.add(name)
        g.node.remove(node)
        g.node.insert(at, helper.make_node("MatMulNBits", [node.input[0], blocks, scales], list(node.output),
                                           name=node.name, domain=MS_DOMAIN, K=K, N=N, bits=bits, block_size=32,
                                           accuracy_level=level))
    _drop_unused(g)
    if tied:
        _embedding_from_head(proto)
    else:
        _embedding_blocks(proto, recipes, shapes)
    _drop_unused(g)


def _add(g, recipes: dict, shapes: dict, name: str, recipe, shape: tuple[int, ...], dtype: str) -> None:
    from .onnx import deferred

    recipes[name], shapes[name] = recipe, shape
    g.initializer.append(deferred(name, shape, dtype))


def _drop_unused(g) -> None:
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


def _lookup(g):
    """The graph's embedding lookup (the one Gather reading a 2-D initializer) and its table, or (None, None)."""
    inits = {t.name: t for t in g.initializer}
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    return (gathers[0], inits[gathers[0].input[0]]) if len(gathers) == 1 else (None, None)


def _embedding_from_head(proto) -> None:
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
        _gather_blocks(g, gather, heads[0].input[1], heads[0].input[2], H, attrs(heads[0])["bits"])


EMBEDDING_BITS = 8  # an untied table's blocks: a lookup reads a few rows a token, so bits cost file and memory only


def _embedding_blocks(proto, recipes: dict, shapes: dict) -> None:
    """An untied model's embedding table (the 9B's 248,320 x 4,096: 3.8 GiB in fp32, most of a 4-bit export)
    stored as q8_0 blocks in MatMulNBits' unsigned form (uint8 q + 128 [V, H/32, 32], fp16 scales [V, H/32]:
    qwen35's q8_0, so a row dequantizes to qwen35's q8_0 row exactly), which the lookup dequantizes for the
    gathered rows only: 1.06 bytes a weight instead of 4, in 8 bits whatever the matrices' bits, since the
    table is never streamed. Left as is where the graph has no lookup or H is not whole blocks."""
    from .onnx_weights import Blocks, Param, Scales

    g = proto.graph
    gather, table = _lookup(g)
    if gather is None or table.dims[1] % 32 or any(table.name in n.input for n in g.node if n is not gather):
        return
    param = recipes.get(table.name)
    if not (isinstance(param, Param) and param.suffix == ""):
        return
    V, H = table.dims
    name = f"{table.name}__q8_0"
    _add(g, recipes, shapes, name + "_blocks", Blocks(param.param, EMBEDDING_BITS), (V, H // 32, 32), "uint8")
    _add(g, recipes, shapes, name + "_scales", Scales(param.param, EMBEDDING_BITS, "float16"), (V, H // 32), "float16")
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
