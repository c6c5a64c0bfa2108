"""`qwen35 train`, `export-onnx` and `qwen35 web` refuse bad input with one line, before loading or building:
outputs that are the input, runs that diverge, data with nothing to train on, flags out of range, resumes that
do not fit the saved run."""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import asdict

import pytest
import torch
from test_train import corpus_rows, small_config

from qwen35 import cli
from qwen35.errors import Qwen35Error
from qwen35.train.data import read_documents
from qwen35.train.loop import STATE_FILE, TrainConfig, init_model, train


def run(capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = cli.main(["train", *argv])
    except SystemExit as e:  # argparse: exit 2
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("Hello world. " * 20)
    return f


def test_out_equal_to_the_model_is_refused_before_loading(chat_model_dir, data, capsys):
    before = {f.name: f.stat().st_mtime_ns for f in chat_model_dir.iterdir()}
    for extra in ((), ("--quant", "int8", "--lora-rank", "2")):
        rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out",
                      str(chat_model_dir) + "/", "--steps", "1", *extra)
        assert rc == 1 and "is the source checkpoint" in err, err
    assert {f.name: f.stat().st_mtime_ns for f in chat_model_dir.iterdir()} == before


def test_export_gguf_onto_the_input_or_a_directory_is_refused(tmp_path, data, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    common = ["--init-from", str(gguf), "--data", str(data), "--out", str(tmp_path / "o"), "--quant", "int8",
              "--lora-rank", "2"]
    rc, err = run(capsys, *common, "--export-gguf", str(tmp_path / "." / "m.gguf"))
    assert rc == 1 and "is the model being fine-tuned" in err, err
    assert gguf.read_bytes() == b"GGUF"
    (tmp_path / "d.gguf").mkdir()
    rc, err = run(capsys, *common, "--export-gguf", str(tmp_path / "d.gguf"))
    assert rc == 1 and "is a directory" in err, err


def test_a_diverging_run_stops_at_the_step_and_saves_nothing(tmp_path):
    cfg = TrainConfig(steps=3, seq_len=64, batch_size=2, lr=1e30, warmup=0)
    with pytest.raises(Qwen35Error, match=r"step \d: the loss is .* training diverged"):
        train(init_model(small_config(), seed=0), corpus_rows(), cfg, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run" / "model.safetensors").exists() and not list((tmp_path / "run").iterdir())


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"),
                                        ("--lora-alpha", "nan"), ("--lora-alpha", "0"), ("--batch-size", "0"),
                                        ("--batch-size", "-1"), ("--seq-len", "0"), ("--seq-len", "1"),
                                        ("--grad-accum", "0"), ("--grad-accum", "-1"), ("--log-every", "0"),
                                        ("--threads", "0"), ("--lora-rank", "-2"), ("--steps", "0"),
                                        ("--steps", "-3"), ("--warmup", "-1"), ("--save-every", "-1"),
                                        ("--mtp-weight", "nan"), ("--mtp-weight", "-1"),
                                        ("--lora-targets", "q_proj,wizard_proj")])
def test_numeric_flags_are_checked_at_the_flag(tmp_path, data, capsys, flag, value):
    rc, err = run(capsys, "--init-from", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o"),
                  "--lora-rank", "2", flag, value)
    assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1, err
    if flag == "--lora-targets":
        assert "wizard_proj" in err


def test_an_earlier_run_in_out_is_refused_without_resume(chat_model_dir, tmp_path, data, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out))
    assert rc == 1 and "metrics.jsonl" in err and "--resume" in err, err
    (out / "metrics.jsonl").unlink()
    (out / "model.safetensors").write_bytes(b"")
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out))
    assert rc == 1 and "model.safetensors" in err, err
    (tmp_path / "afile").write_text("x")
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(tmp_path / "afile"))
    assert rc == 1 and "is not a directory" in err, err


@pytest.mark.parametrize("name,text,match", [
    ("user.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant tokens to train on"),
    ("empty.txt", "", "no text to train on"),
    ("emptytext.jsonl", json.dumps({"text": ""}), "no text to train on"),
    ("nomsgs.jsonl", json.dumps({"messages": []}), "no assistant tokens to train on"),
    ("role.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "wizard", "content": "x"}]}),
     r"role.jsonl:1: messages\[1\]: unknown role 'wizard'"),
])
def test_data_with_nothing_to_train_on_is_an_error_naming_the_file(chat_model_dir, tmp_path, name, text, match):
    import qwen35

    _, tok = qwen35.load(chat_model_dir)
    f = tmp_path / name
    f.write_text(text + "\n" if text else "")
    with pytest.raises(Qwen35Error, match=match) as e:
        read_documents([f], tok)
    assert str(f) in str(e.value)


def test_non_utf8_data_bad_config_and_empty_eval_data(chat_model_dir, tmp_path, data, capsys):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(tmp_path / "bin.txt"), "--out",
                  str(tmp_path / "o"))
    assert rc == 1 and "bin.txt: not UTF-8 text" in err, err
    (tmp_path / "empty.txt").write_text("")
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--eval-data",
                  str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert rc == 1 and "empty.txt: no text to train on" in err, err
    (tmp_path / "c.json").write_text("{bad")
    rc, err = run(capsys, "--config", str(tmp_path / "c.json"), "--tokenizer", str(chat_model_dir), "--data",
                  str(data), "--out", str(tmp_path / "o"))
    assert rc == 1 and "--config" in err and "not valid JSON" in err, err
    assert not (tmp_path / "o").exists()


def test_jsonl_is_recognised_by_suffix_in_any_case_and_as_json(chat_model_dir, tmp_path):
    import qwen35

    _, tok = qwen35.load(chat_model_dir)
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    for name in ("a.JSONL", "a.json"):
        (tmp_path / name).write_text(line + "\n" + line + "\n")
        docs = read_documents([tmp_path / name], tok)
        assert len(docs) == 2 and not all(docs[0].loss)  # two conversations, the user turns unsupervised


def test_seq_len_beyond_the_context_is_refused(chat_model_dir, tmp_path, data, capsys):
    cfg = json.loads((chat_model_dir / "config.json").read_text())
    limit = (cfg.get("text_config") or cfg)["max_position_embeddings"]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    rc, err = run(capsys, "--config", str(tmp_path / "c.json"), "--tokenizer", str(chat_model_dir), "--data",
                  str(data), "--out", str(tmp_path / "o"), "--seq-len", str(limit + 1))
    assert rc == 1 and "exceeds the model's context" in err, err


def test_init_from_context_and_vocabulary_are_checked_before_the_weights_load(chat_model_dir, tied_replica, tmp_path,
                                                                             data, capsys, monkeypatch):
    """--init-from's own config (a directory's config.json, a GGUF's metadata) bounds --seq-len and the
    tokenizer before minutes of loading a large model (they were checked after the load)."""
    import qwen35.weights

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the check")

    monkeypatch.setattr(qwen35.weights, "load_model", no_load)
    cfg = json.loads((chat_model_dir / "config.json").read_text())
    limit = (cfg.get("text_config") or cfg)["max_position_embeddings"]
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                  "--seq-len", str(limit + 1))
    assert rc == 1 and f"--seq-len {limit + 1} exceeds the model's context" in err, err
    model = tmp_path / "m"  # a 320-token replica beside a 248K-token tokenizer
    shutil.copytree(tied_replica[1], model)
    shutil.copy(chat_model_dir / "tokenizer.json", model / "tokenizer.json")
    rc, err = run(capsys, "--init-from", str(model), "--data", str(data), "--out", str(tmp_path / "o2"),
                  "--seq-len", "32")
    assert rc == 1 and "tokens but the model's vocab_size is 320" in err, err


def test_resume_refuses_other_settings_and_a_broken_state(chat_model_dir, tmp_path, data, capsys):
    out = tmp_path / "o"
    out.mkdir()
    common = ["--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out), "--resume", "--steps", "3"]
    rc, err = run(capsys, *common)
    assert rc == 1 and "trainer_state.pt not found" in err, err
    (out / STATE_FILE).write_text("garbage\n")
    rc, err = run(capsys, *common)
    assert rc == 1 and "not a readable trainer state" in err and len(err.strip().splitlines()) == 1, err
    saved = asdict(TrainConfig(lr=1e-4, seq_len=32, batch_size=2))
    torch.save({"step": 1, "losses": [1.0], "config": saved, "optimizer": {}, "scheduler": {}}, out / STATE_FILE)
    for flags, name in ((["--lr", "1e-3", "--seq-len", "32", "--batch-size", "2"], "--lr"),
                        (["--lr", "1e-4", "--seq-len", "64", "--batch-size", "2"], "--seq-len"),
                        (["--lr", "1e-4", "--seq-len", "32", "--batch-size", "4"], "--batch-size")):
        rc, err = run(capsys, *common, *flags)
        assert rc == 1 and f"{name} " in err and "differs from the run" in err, err
    rc, err = run(capsys, *common, "--lr", "1e-4", "--seq-len", "32", "--batch-size", "2", "--lora-rank", "2")
    assert rc == 1 and "holds no lora.safetensors" in err, err


def test_export_onnx_refuses_a_tokenizer_larger_than_the_vocabulary(tied_replica, chat_model_dir, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    from qwen35 import cli

    model = tmp_path / "m"
    shutil.copytree(tied_replica[1], model)
    shutil.copy(chat_model_dir / "tokenizer.json", model / "tokenizer.json")  # 248K tokens, a 320-token model
    rc = cli.main(["export-onnx", str(model), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "the tokenizer has" in err and "tokens but the model's vocab_size is 320" in err
    assert not (tmp_path / "out").exists()


def test_web_checks_its_paths_and_export_before_building(tmp_path, monkeypatch):
    from qwen35.export import web

    monkeypatch.setattr(web, "npm_modules", lambda: tmp_path / "node_modules")
    export = tmp_path / "exp"
    export.mkdir()
    (export / "manifest.json").write_text("{bad")
    (tmp_path / "afile").write_text("x")
    cases = [(export, tmp_path / "afile", "is not a directory"), (export, tmp_path / "afile" / "site", "is a file"),
             (export, export, "is the source checkpoint"), (export, tmp_path / "s", "manifest.json: not valid JSON")]
    for src, out, match in cases:
        with pytest.raises(Qwen35Error, match=match):
            web.build_site(src, out)
    (export / "manifest.json").write_text(json.dumps({"graphs": {"decode": {"file": "decode.onnx"}}}))
    with pytest.raises(Qwen35Error, match=r"missing \(decode.onnx\)"):
        web.build_site(export, tmp_path / "s")
    with pytest.raises(Exception):  # noqa: B017 - a checkpoint that does not exist: whatever export_onnx says
        web.build_site(tmp_path / "nope", tmp_path / "s")
    assert not (tmp_path / "s").exists()  # a failed build takes back the folder it made


def test_web_serve_refuses_a_busy_port_or_bad_host(tmp_path):
    from qwen35.export.web import make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(Qwen35Error, match=f"cannot serve on 127.0.0.1:{s.getsockname()[1]}"):
            make_server(tmp_path, "127.0.0.1", s.getsockname()[1], built=False)
    with pytest.raises(Qwen35Error, match="cannot serve on no.such.host.invalid"):
        make_server(tmp_path, "no.such.host.invalid", 0, built=False)
