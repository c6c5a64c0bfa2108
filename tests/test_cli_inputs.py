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
    from qwen35.checkpoint_index import INDEX_FILE

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


# ---- flags that did nothing, outputs written over, crashes: one line each, before the work ----

def test_chat_ignore_eos_answers_to_max_tokens(monkeypatch, capsys):
    """--ignore-eos reached generate's sampling but not chat's: the answer still stopped at <|im_end|>."""
    from qwen35.commands import chat

    model, tok = qwen35.load(BUNDLED, dtype=torch.float32)
    monkeypatch.setattr(chat, "load_from_args", lambda args: (model, tok))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Thanks!\n/quit\n"))
    assert cli.main(["chat", "--max-tokens", "20", "--temperature", "0", "--no-think", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    # the greedy answer ends by itself after 16 tokens; with the flag it goes on past its end token
    assert "<|im_end|>" in out and "\n[20 tokens; prompt " in out


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_ignore_eos_with_structured_output_is_refused_by_its_flags(command, capsys, monkeypatch):
    from qwen35.commands import common

    def no_load(*a, **k):
        raise AssertionError("loaded the model first")

    monkeypatch.setattr(common, "load_from_args", no_load)
    monkeypatch.setattr(f"qwen35.commands.{command}.load_from_args", no_load)
    extra = ["--prompt", "hi"] if command == "generate" else []
    rc, err, _ = qwen35_cli(capsys, command, *extra, "--ignore-eos", "--json-object")
    assert rc == 2 and one_line(err) and "--ignore-eos cannot be combined with --json-object" in err


def fake_hub(src: Path, monkeypatch, sha: str = "a" * 40) -> list:
    """huggingface_hub's model_info / hf_hub_download serving the files of `src` (LFS records) as commit
    `sha`; returns the repos model_info was asked for."""
    import hashlib
    from types import SimpleNamespace

    import huggingface_hub

    asked = []

    def sibling(f: Path):
        size = f.stat().st_size
        return SimpleNamespace(rfilename=f.name, size=size, blob_id=None,
                               lfs=SimpleNamespace(size=size, sha256=hashlib.sha256(f.read_bytes()).hexdigest()))

    class Api:
        def model_info(self, repo, revision=None, files_metadata=False):
            asked.append(repo)
            return SimpleNamespace(sha=sha, siblings=[sibling(f) for f in sorted(src.iterdir()) if f.is_file()])

    def download(repo, filename, revision=None, local_dir=None):
        shutil.copy(src / filename, Path(local_dir) / filename)
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return asked


def test_download_into_a_file_is_refused_before_the_hub_is_asked(tmp_path, monkeypatch, capsys):
    asked = fake_hub(BUNDLED, monkeypatch)
    rfile = tmp_path / "rfile"
    rfile.write_text("not a folder")
    for out, why in ((rfile, "exists and is not a directory"), (rfile / "sub", "is a file, not a folder")):
        rc, err, _ = qwen35_cli(capsys, "download", "org/model", out)
        assert rc == 1 and one_line(err) and why in err, err
    assert not asked and rfile.read_text() == "not a folder"


def test_download_refuses_a_folder_holding_another_checkpoint(base, tmp_path, monkeypatch, capsys):
    """Another checkpoint's index and shards would stay beside the download and win at load: refused, as
    quantize refuses it. A download of the same repo and commit (its manifest there) resumes; a checkpoint
    file that manifest does not list is refused too."""
    asked = fake_hub(BUNDLED, monkeypatch)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    before = snapshot(other)
    rc, err, _ = qwen35_cli(capsys, "download", "org/model", other)
    assert rc == 1 and one_line(err) and "already holds checkpoint files (config.json" in err
    assert not asked and snapshot(other) == before
    out = tmp_path / "dl"
    assert qwen35_cli(capsys, "download", "org/model", out)[0] == 0
    assert qwen35_cli(capsys, "download", "org/model", out)[0] == 0  # run again: resumes
    (out / "model-extra.safetensors").write_bytes(b"old")
    rc, err, _ = qwen35_cli(capsys, "download", "org/model", out)
    assert rc == 1 and one_line(err) and "qwen35-manifest.json does not list (model-extra.safetensors)" in err


def test_verify_write_manifest_to_a_bad_path_is_one_line(base, tmp_path, capsys):
    rfile = tmp_path / "rfile"
    rfile.write_text("not a folder")
    for manifest, why in ((tmp_path / "nodir" / "m.json", "does not exist"), (tmp_path, "is a directory"),
                          (rfile / "m.json", "is a file, not a folder")):
        rc, err, _ = qwen35_cli(capsys, "verify", base, "--manifest", manifest, "--write-manifest")
        assert rc == 1 and one_line(err) and why in err, err


def test_verify_write_manifest_that_cannot_be_written_is_one_line(base, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(base, src)
    (src / "qwen35-manifest.json").mkdir()  # the default path, a folder in the way
    rc, err, _ = qwen35_cli(capsys, "verify", src, "--write-manifest")
    assert rc == 1 and one_line(err) and "qwen35-manifest.json: cannot write the manifest" in err


@pytest.fixture(scope="module")
def ggufs(base, tmp_path_factory):
    """The bundled model as a bf16 GGUF and a q8_0 one."""
    d = tmp_path_factory.mktemp("gguf")
    for kind in ("bf16", "q8_0"):
        assert cli.main(["export", str(base), str(d / f"{kind}.gguf"), "--type", kind]) == 0
    return d / "bf16.gguf", d / "q8_0.gguf"


def fits(out: str) -> int:
    return int(out.split("up to ")[1].split(" tokens")[0])


def test_info_gguf_quant_plans_the_quantized_weights_or_refuses(ggufs, capsys):
    """--quant on a GGUF was ignored: refused on a quantized file (as load_model refuses it), otherwise
    the memory plan counts the quantized weights, as for a checkpoint directory."""
    bf16, q8 = ggufs
    rc, err, _ = qwen35_cli(capsys, "info", q8, "--quant", "int4")
    assert rc == 1 and one_line(err) and "is already quantized (Q8_0); run it without --quant" in err
    assert qwen35_cli(capsys, "info", q8, "--quant", "q8_0")[0] == 0  # what it holds: as load_model
    rc, _, plain = qwen35_cli(capsys, "info", bf16, "--memory", "64MB")
    rc4, _, int4 = qwen35_cli(capsys, "info", bf16, "--memory", "64MB", "--quant", "int4")
    assert rc == rc4 == 0 and "with --quant int4: weights" in int4
    # 64 MiB less the weights, at 1 KiB of KV per token: bf16 19.7 MiB of weights, int4 ~6.3 MiB
    assert fits(int4) - fits(plain) > 10_000


def test_a_quant_flag_on_a_quantized_gguf_is_named_as_the_flag(ggufs, capsys):
    rc, err, _ = qwen35_cli(capsys, "generate", ggufs[1], "--quant", "int4", "--prompt", "hi")
    assert rc == 1 and one_line(err) and "run it without --quant" in err and "quant=" not in err


def test_info_context_and_memory_beyond_the_model(base, capsys):
    ctx = json.loads((base / "config.json").read_text())
    ctx = (ctx.get("text_config") or ctx)["max_position_embeddings"]
    rc, err, _ = qwen35_cli(capsys, "info", base, "--context", ctx + 1)
    assert rc == 1 and one_line(err) and f"--context {ctx + 1} exceeds the model's context of {ctx} tokens" in err
    rc, _, out = qwen35_cli(capsys, "info", base, "--memory", "1MB")
    assert rc == 0 and "the weights alone (" in out and "do not fit" in out


def test_replica_refuses_a_seed_past_64_bits(tmp_path, capsys):
    rc, err, _ = qwen35_cli(capsys, "replica", tmp_path / "r", "--shape", "tiny", "--seed", 10**23)
    assert rc == 2 and one_line(err) and "argument --seed:" in err and not (tmp_path / "r").exists()


def test_replica_refuses_a_folder_holding_a_checkpoint(base, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(base, out)
    before = snapshot(out)
    rc, err, _ = qwen35_cli(capsys, "replica", out, "--shape", "tiny", "--layers", "1")
    assert rc == 1 and one_line(err) and "already holds checkpoint files" in err and snapshot(out) == before


@pytest.fixture
def quick_bench(monkeypatch):
    """`qwen35 bench` in this process without its process-wide tuning and its seconds of bandwidth probes."""
    import qwen35.runtime
    from qwen35.commands import bench

    monkeypatch.setattr(bench, "read_bandwidth_gbs", lambda *a, **k: 10.0)
    monkeypatch.setattr(qwen35.runtime, "set_threads", lambda n: n)
    monkeypatch.setattr(qwen35.runtime, "tune_allocator", lambda: None)
    return ["bench", str(BUNDLED), "--threads", "1", "--kernels", "off", "--prompt-tokens", "8"]


def no_nan(text: str):
    raise ValueError(f"{text} in the JSON")


def test_bench_one_token_has_no_decode_speed(quick_bench, capsys):
    rc, _, out = qwen35_cli(capsys, *quick_bench, "--gen-tokens", "1", "--json")
    res = json.loads(out.strip().splitlines()[-1], parse_constant=no_nan)  # NaN is not JSON
    assert rc == 0 and res["gen_tokens"] == 1 and res["decode_tok_s"] is None and res["decode_efficiency"] is None
    rc, _, out = qwen35_cli(capsys, *quick_bench, "--gen-tokens", "2", "--json")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1], parse_constant=no_nan)["decode_tok_s"] > 0


def test_bench_context_error_names_its_flags(quick_bench, capsys):
    rc, err, _ = qwen35_cli(capsys, *quick_bench, "--gen-tokens", "999999999")
    assert rc == 1 and one_line(err) and "--prompt-tokens 8 + --gen-tokens 999999999" in err
    assert "exceeds the context of" in err and "max_tokens" not in err


@pytest.mark.parametrize("argv", [
    ["info", "{m}"], ["info", "{m}", "--quant", "int4"], ["generate", "{m}", "--prompt", "hi", "--quant", "int4"],
    ["chat", "{m}", "--quant", "int8"], ["serve", "{m}", "--quant", "int4"], ["bench", "{m}", "--quant", "int4"],
    ["export", "{m}", "{tmp}/o.gguf"], ["export-onnx", "{m}", "{tmp}/onnx"], ["web", "{m}", "{tmp}/web"],
])
def test_every_command_names_what_to_load_for_an_adapters_only_folder(argv, tmp_path, capsys):
    """A quantized base's `train --out` holds adapters alone. Every command that reads a model says so and names
    the merged model; `--quant` and the exporters had said only "config.json not found" (or "no tokenizer.json")."""
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"base": "/models/base", "rank": 2}))
    (ad / "lora.safetensors").write_bytes(b"")
    rc, err, _ = qwen35_cli(capsys, *[a.format(m=ad, tmp=tmp_path) for a in argv])
    assert rc == 1 and err == (f"qwen35: error: {ad} holds LoRA adapters only (their base: /models/base), not a "
                               f"model: write the merged model with `qwen35 train ... --out {ad} --resume --merge "
                               f"bf16` and load {ad / 'merged'}\n"), err
