"""`qwen35 export-onnx`: a checkpoint as two ONNX graphs any onnxruntime drives, plus what a runtime needs.

OUT_DIR gets:
  prefill.onnx   a chunk of T tokens (T >= 1) after P cached ones: input_ids [B, T] and the cache in,
                 logits [B, vocab] of the last position and the cache advanced by T out;
  decode.onnx    the same for exactly one token (no causal mask);
  model.onnx.data the weights of both graphs, stored once (external data: a graph file stays small, and
                 protobuf's 2 GB limit never applies to the weights);
  manifest.json  input/output names, dtypes and symbolic shapes, the cache's order and meaning, the ids a reply
                 stops on (the tokenizer's end-of-turn ids, as qwen35's generation, and config.json's EOS);
  tokenizer.json, tokenizer_config.json (with the chat template), chat_template.jinja.
The cache and its layout are described in onnx_graph.py. --quant int8 / int4 turns every large MatMul into
onnxruntime's MatMulNBits (symmetric blocks of 32: qwen35's q8_0 / q4_0), which its CPU provider and
onnxruntime-web both run (onnx_quant.py).

The model is never loaded: each graph is traced on placeholder weights (`export_graph`), its weight
initializers stay deferred through the graph rewrites, and `GraphWriter` makes each from the checkpoint when it
writes it, a band of rows at a time (onnx_weights.py), so peak memory does not grow with the model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import Qwen35Error
from .onnx_graph import MS_DOMAIN, GraphModel, cache_spec, gated_delta_onnx, graph_weights
from .onnx_quant import IR_VERSION, POLICIES, quantize
from .onnx_weights import Maker, ModelWeights, Param, Recipe, shape_of

OPSETS = range(18, 24)  # what torch's exporter emits and onnxruntime(-web) 1.31+ runs
DATA_FILE = "model.onnx.data"
ALIGN = 4096  # external tensors start on page boundaries, so a runtime may mmap them


class ExportError(Qwen35Error):
    """The model cannot be exported as asked (flag out of range, missing package, unsupported model)."""


def export_onnx(model_path: str | Path, out_dir: str | Path, quant: str | None = None, opset: int = 21,
                progress: bool = False, check_vocab: bool = True) -> dict:
    """Export the text model at `model_path` into `out_dir`; returns the manifest (also written there). The
    weights are read from the checkpoint as they are written (onnx_weights.py): the model is never loaded.
    Refused before anything is written: a quantized checkpoint asked for other blocks (`check_not_requantized`)
    and, unless check_vocab=False (a test's small replica beside a real tokenizer), a tokenizer with ids past
    the model's vocabulary (`check_tokenizer`). Every command that exports (export-onnx, web) comes here."""
    from ..api import resolve
    from ..gguf.reader import is_gguf_path

    if quant is not None and quant not in POLICIES:
        raise ExportError(f"unknown --quant {quant!r} for ONNX: use {', '.join(POLICIES)}")
    if opset not in OPSETS:
        raise ExportError(f"--opset {opset} is not supported: use {OPSETS.start}..{OPSETS.stop - 1}")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({e}): "
                          "pip install onnx onnxscript onnxruntime") from None
    src = resolve(model_path)
    if is_gguf_path(src):
        raise ExportError(f"{src}: export a checkpoint directory (GGUF files carry quantized blocks that ONNX "
                          "graphs would have to dequantize)")
    from ..checkpoint_index import CheckpointTensors, check_not_adapters

    check_not_adapters(src)
    if not (src / "tokenizer.json").is_file():  # before minutes of export
        raise ExportError(f"{src}: no tokenizer.json to put beside the graphs")
    check_not_requantized(src, quant)

    source = CheckpointTensors(src)
    try:
        if check_vocab:
            check_tokenizer(src, source.config)
        return _export(source, [(Path(out_dir), quant, None)], src, opset, progress)[0]
    finally:
        source.close()


# --quant names that make the same blocks as a stored policy: ONNX's int8 is q8_0 everywhere, as qwen35's is
SAME_BLOCKS = {"int8": "q8_0"}


def check_not_requantized(src: Path, quant: str | None) -> None:
    """Another --quant than the checkpoint's stored policy would dequantize its matrices and quantize them again
    in other blocks (int4's q4_k -> fp32 -> q8_0), losing accuracy twice: refused as load_model refuses it."""
    from ..errors import CheckpointError
    from ..quant.checkpoint import read_quant_config

    stored = read_quant_config(src) if src.is_dir() else None
    policy = stored.get("policy") if stored else None
    if policy is None or quant is None or SAME_BLOCKS.get(quant, quant) == SAME_BLOCKS.get(policy, policy):
        return
    keep = f"--quant {policy} or fp32 (export-onnx without --quant, web --quant fp32)" if policy in POLICIES \
        else "fp32 (export-onnx without --quant, web --quant fp32)"
    raise CheckpointError(f"{src} is already quantized ({policy}); export it as {keep}, or export the original "
                          f"checkpoint with --quant {quant}")


def check_tokenizer(src: Path, config) -> None:
    """Refuse a tokenizer with ids past the model's vocabulary (the exported graph's embedding lookup would
    fail at run time on them), as `qwen35 train` does, before minutes of export (`export_onnx` asks it unless
    told not to, so a test may export a small replica beside any tokenizer file)."""
    from ..tokenizer import Tokenizer
    from ..train.data import check_vocab

    try:
        check_vocab(Tokenizer(src).vocab_size, config.vocab_size)
    except Qwen35Error as e:
        raise ExportError(f"{src}: {e}") from None


def export_model(model, targets: list[tuple[Path, str | None, int | None]], tokenizer_from: Path,
                 opset: int = 21) -> list[dict]:
    """Export a loaded model (its parameters in any float dtype, not quantized) once per graph and write every
    target (out_dir, quant, accuracy_level: see `quantize`) from that one export; returns their manifests. The
    tokenizer and chat template come from `tokenizer_from`."""
    return _export(ModelWeights(model), targets, tokenizer_from, opset)


def _export(source, targets: list[tuple[Path, str | None, int | None]], tokenizer_from: Path, opset: int,
            progress: bool = False) -> list[dict]:
    from ..chat_template import find_template

    config = source.config
    # a quantized head must be a MatMul (MatMulNBits replaces MatMuls); fp32 alone keeps a Gemm reading the
    # tied embedding table in place
    head_matmul = any(quant is not None for _, quant, _ in targets)
    recipes: dict[str, Recipe] = {name: Param(*made) for name, made in graph_weights(config, head_matmul).items()}
    shapes = {name: shape_of(r, source) for name, r in recipes.items()}
    weights = dict(shapes)  # the graph's own (quantize adds the shapes of what it makes to `shapes`)
    writers = [GraphWriter(Path(out), Maker(source)) for out, _, _ in targets]
    try:
        for name, decode in (("prefill", False), ("decode", True)):
            if progress:  # tracing is most of an export's time (~100 s a graph for a 9B) and shows no bar
                print(f"tracing the {name} graph (torch.onnx)", file=sys.stderr, flush=True)
            proto = export_graph(config, weights, decode, head_matmul, opset)
            for (_, quant, level), writer in zip(targets, writers):
                graph = _copy(proto)
                if quant is not None:
                    quantize(graph, recipes, shapes, quant, level, tied=config.tie_word_embeddings)
                writer.write(name, graph, recipes, progress)
    finally:
        for w in writers:
            w.close()
    template = find_template(tokenizer_from)[0]
    eos = stop_ids(config, Path(tokenizer_from))
    manifests = []
    for out, quant, _ in targets:
        _copy_tokenizer(Path(tokenizer_from), Path(out), template)
        manifests.append(make_manifest(config, quant, opset, eos))
        (Path(out) / "manifest.json").write_text(json.dumps(manifests[-1], indent=1))
    return manifests


def _copy(proto):
    from onnx import ModelProto

    c = ModelProto()
    c.CopyFrom(proto)
    return c


# What the weights hold while traced: one value each, none that an optimizer rule special-cases (0 or 1), and
# no two alike (the optimizer merges initializers of equal content)
PLACEHOLDER, PLACEHOLDER_STEP = 0.4375, 2.0**-16


def export_graph(config, shapes: dict[str, tuple[int, ...]], decode: bool, head_matmul: bool, opset: int):
    """torch.onnx (dynamo) export of one graph on placeholder weights (one float each, expanded to the
    weight's shape: no memory); returns its ModelProto whose weight initializers are `deferred`, named as
    `graph_weights` names them, for the writer to make from the checkpoint."""
    import onnx_ir as ir

    weights = {n: torch.full((), PLACEHOLDER + i * PLACEHOLDER_STEP).expand(shape)
               for i, (n, shape) in enumerate(shapes.items())}
    graph = GraphModel(config, weights, decode=decode, head_matmul=head_matmul).eval()
    spec = cache_spec(config)
    # example sizes other than 0 and 1 (torch.export specialises those): batch 2, 3 new tokens, 4 cached
    B, T, P = 2, 1 if decode else 3, 4
    size = {"batch": B, "past": P}
    args = [torch.zeros(B, T, dtype=torch.long)] + [torch.zeros(*[size.get(s, s) for s in shape])
                                                    for _, _, shape in spec]
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    ids_dims = {0: batch} if decode else {0: batch, 1: seq}
    past_dims = tuple({0: batch, **({2: past} if "past" in shape else {})} for _, _, shape in spec)
    # The exporter prints its progress on stdout, which belongs to the command's own report, and warns about
    # optional packages and the axis names it merged: noise for our users. Its failures still raise.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export internals (LeafSpec)
        program = torch.onnx.export(
            graph, tuple(args), dynamo=True, opset_version=opset, verbose=False,
            input_names=["input_ids"] + [f"past.{n}" for n, _, _ in spec],
            output_names=["logits"] + [f"present.{n}" for n, _, _ in spec],
            dynamic_shapes={"input_ids": ids_dims, "past": past_dims},
            custom_translation_table={torch.ops.qwen35_onnx.gated_delta.default: gated_delta_onnx})
    model = program.model
    inits = model.graph.initializers
    # every weight must reach the graph as the initializer it was given: had the optimizer folded one into a
    # constant, that constant would hold placeholder values (a bug in GraphModel: an op on weights alone)
    for name, key in graph.keys.items():
        if key not in inits:
            raise AssertionError(f"the ONNX exporter folded weight {name} into a constant")
    big = [v.name for v in inits.values() if v.name not in graph.keys.values() and v.const_value is not None
           and v.const_value.size > 4096]
    if big:
        raise AssertionError(f"the ONNX exporter made constants {big} from weights")
    later = []
    for name, key in graph.keys.items():
        value = inits.pop(key)  # nodes keep reading the value; the proto gets a deferred initializer instead
        value.name = name
        later.append(deferred(name, shapes[name], "float32"))
    proto = ir.serde.serialize_model(model)
    proto.graph.initializer.extend(later)
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    return proto


def deferred(name: str, shape: tuple[int, ...], dtype: str):
    """A TensorProto with no data: the writer makes it from its recipe (`recipes[name]`)."""
    from onnx import TensorProto, helper

    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", DEFERRED
    return t


DEFERRED = "qwen35:deferred"  # the location of a deferred initializer's data until it is written


def _is_deferred(t) -> bool:
    return t.data_location == t.EXTERNAL and any(e.key == "location" and e.value == DEFERRED for e in t.external_data)


class GraphWriter:
    """Saves graphs as OUT/NAME.onnx with every initializer over 1 KB in one shared DATA_FILE: a weight
    several graphs hold is written once (deferred weights by name: the name is the recipe; the exporter's
    own constants by content, which it names differently in each graph). `write` makes each deferred weight
    from its recipe, a band at a time, and moves every other large initializer out of the proto."""

    def __init__(self, out: Path, maker: Maker):
        self.out, self.maker = out, maker
        out.mkdir(parents=True, exist_ok=True)
        self.data = open(out / DATA_FILE, "wb")  # noqa: SIM115 (open across graphs; export_model closes it)
        self.written: dict[object, tuple[int, int]] = {}

    def _start(self) -> int:
        offset = -(-self.data.tell() // ALIGN) * ALIGN
        self.data.seek(offset)
        return offset

    def write(self, name: str, proto, recipes: dict[str, Recipe], progress: bool = False) -> None:
        from onnx import TensorProto, helper

        for node in proto.graph.node:  # the exporter's per-node debug notes (fx nodes, stack traces): 70% of
            del node.metadata_props[:]  # a graph file, useless to a runtime or a browser download
        todo = list(proto.graph.initializer)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"writing {self.out.name}/{name}.onnx", unit="tensor", leave=False)
        for t in todo:
            if _is_deferred(t):
                key = ("deferred", t.name)
                if key not in self.written:
                    offset = self._start()
                    for chunk in self.maker.chunks(recipes[t.name]):
                        self.data.write(np.ascontiguousarray(chunk).data)
                    length = self.data.tell() - offset
                    size = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                    if length != size:
                        raise AssertionError(f"{t.name}: wrote {length} bytes for a {list(t.dims)} tensor")
                    self.written[key] = (offset, length)
            else:
                raw = _raw(t)
                if len(raw) < 1024:
                    if bar is not None:
                        bar.update(1)
                    continue
                key = (t.data_type, tuple(t.dims), _digest(raw))
                if key not in self.written:
                    offset = self._start()
                    self.data.write(raw)
                    self.written[key] = (offset, len(raw))
            offset, length = self.written[key]
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
            del t.external_data[:]
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            t.data_location = TensorProto.EXTERNAL
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        (self.out / f"{name}.onnx").write_bytes(proto.SerializeToString())

    def close(self) -> None:
        self.data.close()


def _raw(t) -> bytes:
    from onnx import numpy_helper

    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def _digest(raw: bytes) -> bytes:
    import hashlib

    return hashlib.blake2b(raw, digest_size=16).digest()


def _copy_tokenizer(src: Path, out: Path, template: str) -> None:
    """tokenizer.json as is; tokenizer_config.json with the chat template inside (where JS tokenizers such
    as transformers.js look for it), and the template as chat_template.jinja too."""
    if not (src / "tokenizer.json").is_file():
        raise ExportError(f"{src}: no tokenizer.json to put beside the graphs")
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def stop_ids(config, tokenizer_from: Path) -> list[int]:
    """The ids a reply stops on: the tokenizer's end-of-turn ids (its eos, <|im_end|>, <|endoftext|>), which
    qwen35's own generation stops on, then any other EOS config.json names. Qwen3.5's config names
    <|endoftext|> alone, and a chat reply ends with <|im_end|>."""
    from ..tokenizer import Tokenizer

    out = list(Tokenizer(tokenizer_from).eos_token_ids)
    return out + [i for i in config.eos_token_ids if i not in out]


def make_manifest(config, quant: str | None, opset: int, eos_token_ids: list[int]) -> dict:
    """What any runtime needs to drive the graphs, without reading them. eos_token_ids: the ids generation
    stops on (`stop_ids`)."""
    spec = cache_spec(config)
    cache = [{"name": n, "kind": kind, "layer": int(n.split(".")[0]), "dtype": "float32", "shape": list(shape)}
             for n, kind, shape in spec]
    return {
        "format": "qwen35-onnx", "version": 1, "quant": quant, "opset": opset,
        "graphs": {"prefill": {"file": "prefill.onnx", "tokens": "seq"},
                   "decode": {"file": "decode.onnx", "tokens": 1}},
        "external_data": DATA_FILE,
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
                  + [dict(c, name=f"past.{c['name']}") for c in cache],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", config.vocab_size],
                     "note": "the last position only"}]
                   + [dict(c, name=f"present.{c['name']}") for c in cache],
        "cache": "feed each present.X back as past.X; start with zeros and past = 0 (key/value [batch, Hkv, 0, "
                 "head_dim]); conv holds the last K-1 pre-convolution inputs, recurrent the Gated DeltaNet state "
                 "[Hv, Dk, Dv] in fp32, key/value the attention layers' rotated keys and values",
        "contrib_ops": [f"{MS_DOMAIN}.LinearAttention"] + ([f"{MS_DOMAIN}.MatMulNBits"] if quant else []),
        "vocab_size": config.vocab_size,
        "eos_token_ids": list(eos_token_ids),
        "tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
        "chat_template": "chat_template.jinja",
    }


def cache_zeros(manifest: dict, batch: int = 1) -> dict[str, np.ndarray]:
    """The empty cache as onnxruntime feeds: {past.NAME: zeros}."""
    return {i["name"]: np.zeros([batch if s == "batch" else 0 if s == "past" else s for s in i["shape"]],
                                np.float32)
            for i in manifest["inputs"] if i["name"].startswith("past.")}
