"""Bad inputs to the commands, each a one-line error before work starts (never a traceback, never a source
overwritten): output paths, size flags, non-UTF-8 text, flags that were accepted and ignored, and tampered
quantized checkpoints, which load_model and `qwen35 verify` refuse alike."""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from qwen35 import cli
from qwen35.errors import Qwen35Error

BUNDLED = Path(__file__).resolve().parent.parent / "qwen35" / "assets" / "model"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def qwen35_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of `qwen35 ARGV` run in this process; a flag error's SystemExit is its code."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.err, out.out


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs") / "base"
    shutil.copytree(BUNDLED, d)
    return d


def _quantized(base: Path, out: Path, quant: str) -> Path:
    from qwen35.quant.checkpoint import save_quantized

    model = qwen35.load_model(base, dtype=torch.bfloat16, quant=quant, kernels=False)
    save_quantized(model, base, out)
    return out


@pytest.fixture(scope="module")
def int8_dir(base, tmp_path_factory):
    return _quantized(base, tmp_path_factory.mktemp("q") / "int8", "int8")


@pytest.fixture(scope="module")
def int4_dir(base, tmp_path_factory):
    return _quantized(base, tmp_path_factory.mktemp("q") / "int4", "int4")


def snapshot(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()}


# ---- 1, 2, 4: output paths ----

@pytest.mark.parametrize("spelling", ["same", "slash", "symlink"])
def test_quantize_refuses_to_write_over_its_source(base, tmp_path, capsys, spelling):
    src = tmp_path / "src"
    shutil.copytree(base, src)
    before = snapshot(src)
    out = {"same": str(src), "slash": str(src) + "/", "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        os.symlink(src, out)
    rc, err, _ = qwen35_cli(capsys, "quantize", src, out, "--quant", "int8")
    assert rc == 1 and one_line(err) and "is the source checkpoint" in err and str(src) in err
    assert snapshot(src) == before


def test_quantize_into_a_folder_inside_its_source_is_fine(base, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(base, src)
    before = snapshot(src)
    assert qwen35_cli(capsys, "quantize", src, src / "int8", "--quant", "int8")[0] == 0
    assert snapshot(src) == before and qwen35.load_model(src / "int8", kernels=False).quant == "int8"


def test_quantize_refuses_a_folder_holding_a_checkpoint(base, int8_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(int8_dir, out)
    (out / "model-extra.safetensors").write_bytes(b"old")
    rc, err, _ = qwen35_cli(capsys, "quantize", base, out, "--quant", "int4")
    assert rc == 1 and one_line(err) and "already holds checkpoint files" in err and "config.json" in err


def test_quantize_reports_the_size_of_the_shards_it_wrote(base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")  # a folder with other files is fine
    rc, _, said = qwen35_cli(capsys, "quantize", base, out, "--quant", "int8", "--max-shard-gb", "0.005")
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    size = sum((out / n).stat().st_size for n in set(shards))
    assert rc == 0 and len(set(shards)) > 1 and f"(int8, {size / 2**20:.1f} MiB of weights)" in said


def output_cases(base: Path, tmp: Path):
    rfile = tmp / "rfile"
    rfile.write_text("not a folder")
    (tmp / "adir.gguf").mkdir()
    return [
        (["export", base, tmp / "nodir" / "x.gguf"], "does not exist"),
        (["export", base, tmp / "adir.gguf"], "is a directory"),
        (["quantize", base, rfile, "--quant", "int8"], "is not a directory"),
        (["quantize", base, rfile / "sub", "--quant", "int8"], "is a file, not a folder"),
        (["replica", rfile, "--shape", "tiny"], "is not a directory"),
        (["export-onnx", base, rfile], "is not a directory"),
        (["export-onnx", base, str(base) + "/"], "is the source checkpoint"),
    ]


def test_bad_output_paths_are_one_line_errors(base, tmp_path, capsys):
    for argv, why in output_cases(base, tmp_path):
        rc, err, _ = qwen35_cli(capsys, *argv)
        assert rc == 1 and one_line(err) and why in err, (argv, err)
    assert (tmp_path / "rfile").read_text() == "not a folder"


def test_export_onto_its_source_gguf_still_works(base, tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    assert qwen35_cli(capsys, "export", base, gguf)[0] == 0
    assert qwen35_cli(capsys, "export", gguf, gguf, "--type", "q8_0")[0] == 0
    rc, _, out = qwen35_cli(capsys, "info", gguf)
    assert rc == 0 and "file type Q8_0" in out


# ---- 5, 8: flags refused at start (exit 2) ----

BAD_FLAGS = [
    (["quantize", "m", "o", "--quant", "int8", "--max-shard-gb", "nan"], "--max-shard-gb"),
    (["quantize", "m", "o", "--quant", "int8", "--max-shard-gb", "-1"], "--max-shard-gb"),
    (["quantize", "m", "o", "--quant", "int8", "--max-shard-gb", "0"], "--max-shard-gb"),
    (["export", "m", "o.gguf", "--split-max-gb", "-1"], "--split-max-gb"),
    (["export", "m", "o.gguf", "--split-max-gb", "inf"], "--split-max-gb"),
    (["replica", "o", "--shard-gb", "-1"], "--shard-gb"), (["replica", "o", "--layers", "0"], "--layers"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p"), (["chat", "--top-p", "0.0"], "--top-p"),
    (["generate", "--prompt", "abc\udcff"], "--prompt"), (["chat", "--system", "\udcfeok"], "--system"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_refused_at_start(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err, _ = qwen35_cli(capsys, *argv)
    assert rc == 2 and one_line(err) and f"argument {flag}:" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_top_p_error_states_the_samplers_rule(capsys):
    assert "must be in (0, 1]" in qwen35_cli(capsys, "generate", "--prompt", "hi", "--top-p", "0")[1]


# ---- 3: text that is not UTF-8 ----

def test_non_utf8_stdin_is_named():
    out = subprocess.run([sys.executable, "-m", "qwen35", "generate", "--max-tokens", "2"], input=b"abc\xff\n",
                         capture_output=True, env=ENV, timeout=120, check=False)
    err = out.stderr.decode()
    assert out.returncode == 1 and one_line(err) and "stdin is not valid UTF-8" in err and "0xff" in err


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_an_unreadable_schema_file_is_named_before_loading(command, tmp_path, capsys, monkeypatch):
    from qwen35.commands import common

    def no_load(*a, **k):
        raise AssertionError("loaded the model first")

    monkeypatch.setattr(common, "load_from_args", no_load)
    monkeypatch.setattr(f"qwen35.commands.{command}.load_from_args", no_load)
    extra = ["--prompt", "hi"] if command == "generate" else []
    rc, err, _ = qwen35_cli(capsys, command, *extra, "--json-schema", tmp_path / "missing.json")
    assert rc == 1 and one_line(err) and "--json-schema" in err and "missing.json: cannot read it" in err


@pytest.mark.parametrize("flag", ["json_schema", "grammar"])
def test_non_utf8_schema_and_grammar_files_are_named(flag, tmp_path):
    from qwen35.commands.common import structured_from_args

    f = tmp_path / "bad.txt"
    f.write_bytes(b'{"a\xff": 1}')
    args = argparse.Namespace(json_schema=None, grammar=None)
    setattr(args, flag, str(f))
    with pytest.raises(Qwen35Error, match=f"--{flag.replace('_', '-')} {f}: not UTF-8 text"):
        structured_from_args(args)


def test_a_non_utf8_chat_line_is_reported_and_the_session_goes_on(monkeypatch, capsys):
    from qwen35.commands import chat

    model, tok = qwen35.load(BUNDLED, dtype=torch.float32)
    monkeypatch.setattr(chat, "load_from_args", lambda args: (model, tok))
    monkeypatch.setattr(sys, "stdin", io.StringIO("abc\udcff\nHello\n/quit\n"))
    rc = cli.main(["chat", "--max-tokens", "2", "--temperature", "0", "--no-think"])
    out = capsys.readouterr().out
    assert rc == 0 and "(that message is not valid UTF-8 text (byte 0xff at character 3); nothing was sent)" in out
    assert out.count(" tokens; prompt ") == 1  # the next line was answered


# ---- 6: bench checks the context before building its prompt ----

def test_bench_refuses_a_prompt_past_the_context_before_building_it():
    out = subprocess.run([sys.executable, "-m", "qwen35", "bench", str(BUNDLED), "--prompt-tokens", "999999999"],
                         capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert out.returncode == 1 and "exceeds the context of" in out.stderr.strip().splitlines()[-1]


# ---- 7, 9: flags that were accepted and ignored ----

def test_system_without_chat_is_refused(capsys):
    rc, err, _ = qwen35_cli(capsys, "generate", "--prompt", "hi", "--system", "be brief")
    assert rc == 2 and one_line(err) and "--system needs --chat" in err


def test_info_refuses_another_quant_on_a_quantized_checkpoint(int4_dir, capsys):
    rc, err, _ = qwen35_cli(capsys, "info", int4_dir, "--quant", "int8")
    assert rc == 1 and one_line(err) and "is already quantized (int4)" in err
    assert qwen35_cli(capsys, "info", int4_dir, "--quant", "int4")[0] == 0  # what it holds: as load_model


def test_info_lists_a_directorys_tensors(base, capsys):
    rc, _, out = qwen35_cli(capsys, "info", base, "--tensors")
    assert rc == 0 and "model.layers.0.linear_attn.A_log" in out and "float32" in out


def test_export_onnx_refuses_to_requantize_a_quantized_checkpoint(int4_dir, tmp_path, capsys):
    rc, err, _ = qwen35_cli(capsys, "export-onnx", int4_dir, tmp_path / "onnx", "--quant", "int8")
    assert rc == 1 and one_line(err) and "is already quantized (int4)" in err
    assert not (tmp_path / "onnx").exists()


# ---- 10, 11: tampered quantized checkpoints: load_model and verify refuse them alike ----

def tamper_config(src: Path, out: Path, edit) -> Path:
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def tamper_tensors(src: Path, out: Path, edit) -> Path:
    shutil.copytree(src, out)
    (f,) = out.glob("*.safetensors")
    t = load_file(f)
    edit(t)
    save_file(t, f, metadata={"format": "pt"})
    return out


UP = "model.layers.2.mlp.up_proj.weight"


def _nan_header(t):
    t["model.layers.0.mlp.up_proj.weight.qs"][3, 0:2] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)


CONFIG_CASES = {
    "block_64": ("int8", lambda q: q.update(block_size=64), "block_size 64 is not supported"),
    "block_str": ("int8", lambda q: q.update(block_size="x"), "block_size 'x' is not supported"),
    "policy_bogus": ("int8", lambda q: q.update(policy="bogus"), "policy 'bogus' is not one of"),
    "layout_q4_0": ("int8", lambda q: q["tensors"].update({UP: "q4_0"}),
                    f"quantized tensor '{UP}.qs' does not match q4_0"),
    "norm": ("int8", lambda q: q["tensors"].update({"model.layers.0.input_layernorm.weight": "q8_0"}),
             "'model.layers.0.input_layernorm.weight', which is never quantized"),
    "alog": ("int8", lambda q: q["tensors"].update({"model.layers.0.linear_attn.A_log": "q8_0"}),
             "'model.layers.0.linear_attn.A_log', which is never quantized"),
    "gptq": ("int8", lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
}
TENSOR_CASES = {
    "d_nan": ("int8", lambda t: t[UP + ".d"].__setitem__((3, 0), float("nan")), f"'{UP}.d' has NaN or infinite"),
    "d_inf": ("int8", lambda t: t[UP + ".d"].__setitem__((3, 0), float("inf")), f"'{UP}.d' has NaN or infinite"),
    "k_nan": ("int4", _nan_header, "'model.layers.0.mlp.up_proj.weight.qs' has NaN or infinite scales"),
    "qs_u8": ("int8", lambda t: t.update({UP + ".qs": t[UP + ".qs"].view(torch.uint8)}), "found uint8"),
    "d_f32": ("int8", lambda t: t.update({UP + ".d": t[UP + ".d"].float()}), "found float32"),
}


def test_stored_layouts_need_not_be_todays_policys(int8_dir, tmp_path, capsys):
    """A checkpoint whose layouts are valid for their tensors loads whatever policy it names (one an earlier
    version wrote, when int4 chose other layouts, keeps loading)."""
    path = tamper_config(int8_dir, tmp_path / "q", lambda q: q.update(policy="int4"))
    assert qwen35.load_model(path, kernels=False).quant == "int4"
    rc, _, out = qwen35_cli(capsys, "verify", path)
    assert rc == 0, out


@pytest.fixture
def tampered(int8_dir, int4_dir, tmp_path, request):
    name = request.param
    if name in CONFIG_CASES:
        quant, edit, why = CONFIG_CASES[name]
        return tamper_config(int8_dir if quant == "int8" else int4_dir, tmp_path / name, edit), why
    quant, edit, why = TENSOR_CASES[name]
    return tamper_tensors(int8_dir if quant == "int8" else int4_dir, tmp_path / name, edit), why


CASES = [*CONFIG_CASES, *TENSOR_CASES]


@pytest.mark.parametrize("tampered", CASES, indirect=True)
def test_a_tampered_quantized_checkpoint_is_refused_by_load_and_verify(tampered, capsys):
    from qwen35.errors import CheckpointError

    path, why = tampered
    with pytest.raises(CheckpointError, match=None) as e:
        qwen35.load_model(path, kernels=False)
    assert why in str(e.value)
    rc, _, out = qwen35_cli(capsys, "verify", path)
    out = out.strip().splitlines()
    assert rc == 1 and len(out) == 2 and why in out[0] and out[1].endswith("1 problem(s)")  # the one problem, nothing else


def test_verify_checks_what_load_model_checks_of_plain_tensors(base, int8_dir, tmp_path, capsys):
    from qwen35.weights import INDEX_FILE

    w_int = tamper_tensors(base, tmp_path / "w_int", lambda t: t.update(
        {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].to(torch.int8)}))
    plain = tamper_tensors(int8_dir, tmp_path / "plain", lambda t: t.update(
        {UP: torch.zeros(768, 256, dtype=torch.bfloat16)}))
    for d, key in ((w_int, "model.layers.0.mlp.up_proj.weight"), (plain, UP)):  # the index names the new tensor
        index = json.loads((d / INDEX_FILE).read_text())
        index["weight_map"][key] = next(iter(index["weight_map"].values()))
        (d / INDEX_FILE).write_text(json.dumps(index))
    mtp = tmp_path / "mtp"
    shutil.copytree(base, mtp)
    cfg = json.loads((mtp / "config.json").read_text())
    (cfg.get("text_config") or cfg)["mtp_num_hidden_layers"] = 2
    (mtp / "config.json").write_text(json.dumps(cfg))
    for d, why in ((w_int, "non-float dtype"), (plain, f"unexpected tensor: '{UP}'"),
                   (mtp, "mtp_num_hidden_layers=2 but the checkpoint has 1")):
        with pytest.raises(Qwen35Error):
            qwen35.load_model(d, kernels=False)
        rc, _, out = qwen35_cli(capsys, "verify", d)
        out = out.strip().splitlines()
        assert rc == 1 and len(out) == 2 and why in out[0], out
