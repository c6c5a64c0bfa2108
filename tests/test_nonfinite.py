# ruff: noqa: F811 - the fixtures imported from test_weights and test_gguf are parameters of the tests here
"""NaN and infinities: a checkpoint holding one is refused at load with the tensor named (safetensors and GGUF,
plain and quantized at load, and past float16's range when loading in float16; stored quantized scales:
test_cli_inputs); logits holding NaN are a
SamplingError on every sampling path, greedy included, never token 0 or a torch error."""

import math

import pytest
import torch
from test_gguf import src  # noqa: F401 - fixture
from test_weights import ckpt, rewrite  # noqa: F401 - fixture

import qwen35
from qwen35 import CheckpointError
from qwen35.errors import SamplingError
from qwen35.gguf import export_gguf, load_gguf
from qwen35.gguf.reader import open_gguf
from qwen35.sampling import Sampler, SamplingParams

KEY = "model.language_model.layers.1.mlp.up_proj.weight"


def poison(ckpt, key, at, value):
    def edit(t):
        t[key].view(-1)[at] = value

    rewrite(ckpt, edit)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("quant", [None, "int8", "int4", "q4_0"])
def test_a_nonfinite_weight_is_named(ckpt, quant, value):
    poison(ckpt, KEY, 777, value)
    with pytest.raises(CheckpointError, match=rf"tensor '{KEY}' holds 1 NaN or infinite value: the checkpoint is "
                                              "corrupt$"):
        qwen35.load_model(ckpt, quant=quant)


def test_norms_and_decays_are_checked_too(ckpt):
    key = "model.language_model.layers.0.linear_attn.A_log"
    poison(ckpt, key, 0, math.nan)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' holds 1 NaN"):
        qwen35.load_model(ckpt)


def test_values_past_float16s_range_are_named_when_loading_in_float16(ckpt):
    poison(ckpt, KEY, 5, 1e5)
    qwen35.load_model(ckpt, dtype=torch.bfloat16)  # finite in bf16 and fp32: loads
    with pytest.raises(CheckpointError, match=rf"tensor '{KEY}' holds 1 NaN or infinite value \(or values past "
                                              r"float16's range of \+-65504: load it in bfloat16 or float32\)"):
        qwen35.load_model(ckpt, dtype=torch.float16)


def _damage_gguf(path, name, at, raw: bytes):
    t = open_gguf(path).tensors[name]
    with open(path, "r+b") as f:
        f.seek(t.offset + at)
        f.write(raw)


def test_a_nan_in_a_gguf_float_tensor_is_named(src, tmp_path):
    export_gguf(qwen35.load_model(src, dtype=torch.bfloat16, kernels=False), tmp_path / "m.gguf", "bf16")
    _damage_gguf(tmp_path / "m.gguf", "blk.1.ffn_up.weight", 2 * 10, b"\xc0\x7f")  # bf16 NaN
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'blk\.1\.ffn_up\.weight' holds 1 NaN"):
        load_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False)
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.1\.ffn_up\.weight' holds 1 NaN"):  # quantized at load
        load_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False, quant="q8_0")


@pytest.mark.parametrize("raw", [b"\x00\x7e", b"\x00\x7c"])  # fp16 NaN, +inf
def test_a_nonfinite_gguf_block_scale_is_named(src, tmp_path, raw):
    model = qwen35.load_model(src, dtype=torch.bfloat16, kernels=False, quant="q8_0")
    export_gguf(model, tmp_path / "m.gguf", "q8_0")
    assert open_gguf(tmp_path / "m.gguf").tensors["blk.1.ffn_up.weight"].tensor_type.name == "Q8_0"
    _damage_gguf(tmp_path / "m.gguf", "blk.1.ffn_up.weight", 34 * 3, raw)  # the 4th block's d
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.1\.ffn_up\.weight' has NaN or infinite block scales"):
        load_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16, kernels=False)


def test_k_quant_scales_are_read_from_their_blocks():
    from qwen35.quant import formats

    w = torch.randn(4, 512)
    for name in ("q4_k", "q6_k"):
        qs, d = formats.quantize(name, w)
        assert formats.finite_scales(name, qs, d)
        at = 0 if name == "q4_k" else 208  # d's place in the block (q4_k's dmin follows at 2)
        for off in (at, at + 2) if name == "q4_k" else (at,):
            bad = qs.clone().reshape(4, 2, -1)
            bad[2, 1, off : off + 2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)
            assert not formats.finite_scales(name, bad.reshape(qs.shape), d)


def nan_logits(V=1000):
    x = torch.randn(1, V)
    x[0, 123] = math.nan
    return x


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.8), SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=0.8, min_p=0.1), SamplingParams(temperature=0.8, top_k=20),
], ids=["greedy", "greedy-penalty", "sample", "top_p", "min_p", "top_k"])
def test_nan_logits_are_a_sampling_error(params):
    with pytest.raises(SamplingError, match="cannot draw a token: the logits hold NaN"):
        Sampler(params, 1000)(nan_logits())
    assert Sampler(params, 1000)(torch.randn(1, 1000)).shape == (1,)  # finite logits still draw
