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


def test_gguf_type_takes_the_policy_names_as_export_does(tmp_path, data, capsys):
    """--gguf-type int4 / int8 name q4_k_m / q8_0, as `qwen35 export --type` does (they had been refused)."""
    import argparse

    from qwen35.commands.train import check_flags, setup_parser

    p = argparse.ArgumentParser()
    setup_parser(p)
    for given, gguf_type in (("int4", "q4_k_m"), ("int8", "q8_0"), ("q4_0", "q4_0")):
        args = p.parse_args(["--config", "c.json", "--data", str(data), "--out", str(tmp_path / "o"), "--gguf-type",
                             given])
        check_flags(args)
        assert args.gguf_type == gguf_type
    rc, err = run(capsys, "--config", "c.json", "--data", str(data), "--out", str(tmp_path / "o"), "--gguf-type", "q5")
    assert rc == 2 and "--gguf-type q5: use one of f32, bf16, q8_0, q4_0, q4_k_m, int8, int4" in err, err


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
    (out / "trainer_state.pt").write_bytes(b"x")
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out))
    assert rc == 1 and "(metrics.jsonl, trainer_state.pt)" in err and "--resume" in err, err
    (out / "metrics.jsonl").unlink()
    (out / "trainer_state.pt").unlink()
    (out / "model.safetensors").write_bytes(b"")
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out))
    assert rc == 1 and "model.safetensors" in err, err
    (tmp_path / "afile").write_text("x")
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(tmp_path / "afile"))
    assert rc == 1 and "is not a directory" in err, err


@pytest.mark.parametrize("name,text,match", [
    ("user.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant tokens to train on"),
    ("empty.txt", "", "no text to train on"),
    ("blank.txt", "   \n\n\t  ", "no text to train on"),
    ("blanktext.jsonl", json.dumps({"text": " \n\t "}), "no text to train on"),
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


@pytest.fixture
def no_load(monkeypatch):
    """Loading the weights is an error: what a test refuses must be refused before it."""
    import qwen35.weights

    def load(*a, **k):
        raise Qwen35Error("the weights were loaded")

    monkeypatch.setattr(qwen35.weights, "load_model", load)


def save_state(out, step: int = 1, lora: dict | None = None, **config) -> None:
    out.mkdir(exist_ok=True)
    saved = asdict(TrainConfig(lr=1e-4, seq_len=32, batch_size=2, **config))
    torch.save({"step": step, "losses": [1.0] * step, "config": saved, "optimizer": {}, "scheduler": {},
                "lora": lora}, out / STATE_FILE)


def test_resume_refuses_other_warmup_seed_mtp_weight_bf16_and_data(chat_model_dir, tmp_path, data, capsys, no_load):
    from qwen35.train.data import data_fingerprint

    out = tmp_path / "o"
    save_state(out, data=data_fingerprint([data]))
    common = ["--init-from", str(chat_model_dir), "--out", str(out), "--resume", "--steps", "3", "--lr", "1e-4",
              "--seq-len", "32", "--batch-size", "2"]
    other = tmp_path / "other.txt"
    other.write_text("Goodbye world. " * 20)
    same = tmp_path / "renamed.txt"  # the same bytes under another name: the same data
    same.write_bytes(data.read_bytes())

    def shown(f):
        name, size, digest = data_fingerprint([f])[0]
        return f"{name} [{size} bytes, sha256 {digest[:12]}]"

    other_data = f"--data {shown(other)} differs from the run in {{}} ({shown(data)}): resume with the run's own files"
    cases = [(["--warmup", "5"], "--warmup 5 differs from the run in {} (10): resume with --warmup 10"),
             (["--seed", "7"], "--seed 7 differs from the run in {} (0): resume with --seed 0"),
             (["--mtp-weight", "0"], "--mtp-weight 0 differs from the run in {} (0.3): resume with --mtp-weight 0.3"),
             (["--bf16"], "--bf16 on differs from the run in {} (off): resume without --bf16"),
             ([], other_data)]
    for flags, message in cases:
        rc, err = run(capsys, *common, "--data", str(other if not flags else data), *flags)
        assert rc == 1 and err == f"qwen35: error: {message.format(out)}, or train into a new --out\n", err
    rc, err = run(capsys, *common, "--data", str(same))
    assert rc == 1 and err == "qwen35: error: the weights were loaded\n", err


def test_resume_refuses_another_lora_alpha_or_base_before_loading(chat_model_dir, tied_replica, tmp_path, data,
                                                                  capsys, no_load):
    from safetensors.torch import save_file

    out = tmp_path / "o"
    base = str(chat_model_dir.resolve())
    save_state(out, lora={"rank": 2, "scale": 2.0, "base": base})
    save_file({"model.layers.0.mlp.up_proj.lora_A": torch.zeros(2, 8)}, str(out / "lora.safetensors"))
    common = ["--data", str(data), "--out", str(out), "--resume", "--steps", "3", "--lr", "1e-4", "--seq-len", "32",
              "--batch-size", "2", "--lora-rank", "2"]
    rc, err = run(capsys, "--init-from", str(chat_model_dir), *common, "--lora-alpha", "64")
    assert rc == 1 and err == (f"qwen35: error: --lora-alpha 64 (scale 32) differs from the run in {out} (--lora-alpha "
                               "4, scale 2): resume with --lora-alpha 4, or train into a new --out\n"), err
    rc, err = run(capsys, "--init-from", str(tied_replica[1]), *common)
    assert rc == 1 and err == (f"qwen35: error: --init-from {tied_replica[1]} differs from the base of the run in "
                               f"{out} ({base}): resume with --init-from {base}, or train into a new --out\n"), err


def test_load_adapters_refuses_another_scale_or_base(tied_replica, tmp_path):
    """A quantized base's run keeps its adapters' scale and base in adapter_config.json; resuming them with
    another --lora-alpha or on another --init-from would have trained (and rewritten the file) silently."""
    import qwen35
    from qwen35.train.lora import apply_lora
    from qwen35.train.qlora import load_adapters, save_adapters

    path = tied_replica[1]
    model = qwen35.load_model(path)
    apply_lora(model, 2)
    save_adapters(model, tmp_path / "ad")
    other = qwen35.load_model(path)
    apply_lora(other, 2, alpha=50)
    with pytest.raises(Qwen35Error) as e:
        load_adapters(other, tmp_path / "ad")
    assert str(e.value) == (f"--lora-alpha 50 (scale 25) differs from the run in {tmp_path / 'ad'} (--lora-alpha 4, "
                            "scale 2): resume with --lora-alpha 4, or train into a new --out")
    shutil.copytree(path, tmp_path / "copy")
    other = qwen35.load_model(tmp_path / "copy")
    apply_lora(other, 2)
    with pytest.raises(Qwen35Error) as e:
        load_adapters(other, tmp_path / "ad")
    assert str(e.value) == (f"--init-from {(tmp_path / 'copy').resolve()} differs from the base of the run in "
                            f"{tmp_path / 'ad'} ({path.resolve()}): resume with --init-from {path.resolve()}, or "
                            "train into a new --out")
    load_adapters(model, tmp_path / "ad")  # its own base and scale


def test_resume_of_a_complete_run_or_to_fewer_steps_stops_before_loading(chat_model_dir, tmp_path, data, capsys,
                                                                        no_load):
    out = tmp_path / "o"
    save_state(out, step=6)
    common = ["--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out), "--resume", "--lr",
              "1e-4", "--seq-len", "32", "--batch-size", "2"]
    assert cli.main(["train", *common, "--steps", "6"]) == 0
    assert capsys.readouterr().out == (f"run already complete: step 6 of 6 in {out} (nothing to train; a higher "
                                       "--steps continues it)\n")
    rc, err = run(capsys, *common, "--steps", "4")
    assert rc == 1 and err == (f"qwen35: error: --steps 4 is below the step the run in {out} has reached (6): "
                               "resume with --steps 6 or more\n"), err


def test_torchrun_batch_is_checked_before_loading_and_fsdp_takes_resume_lora_and_eval(chat_model_dir, tmp_path, data,
                                                                                      capsys, no_load, monkeypatch):
    """A global batch that does not split across torchrun's WORLD_SIZE is refused before anything loads (it was a
    ValueError traceback after the load). --fsdp with --resume, --lora-rank or --eval-data was refused too; they
    run now (test_train.py: test_fsdp_*), so they get past the checks to the load."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "o"
    common = ["--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out), "--lr", "1e-4",
              "--seq-len", "32", "--steps", "3"]
    rc, err = run(capsys, *common, "--batch-size", "3")
    assert rc == 1 and err == "qwen35: error: --batch-size 3 (global) must be a multiple of the 2 processes\n", err
    save_state(out)
    rc, err = run(capsys, *common, "--batch-size", "2", "--resume", "--fsdp")
    assert rc == 1 and err == "qwen35: error: the weights were loaded\n", err
    fresh = [*common[:5], str(tmp_path / "o2"), *common[6:], "--batch-size", "2", "--fsdp"]
    for flags in (["--lora-rank", "2"], ["--eval-data", str(data)]):
        rc, err = run(capsys, *fresh, *flags)
        assert rc == 1 and err == "qwen35: error: the weights were loaded\n", (flags, err)


def test_a_state_without_optimizer_names_the_sharded_run_that_wrote_it(chat_model_dir, tmp_path, data, capsys,
                                                                         no_load):
    """Sharded (FSDP) runs saved no optimizer state before they could resume: such a state is refused by name."""
    out = tmp_path / "o"
    save_state(out)
    state = torch.load(out / STATE_FILE, weights_only=False)
    del state["optimizer"]
    torch.save(state, out / STATE_FILE)
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out), "--lr", "1e-4",
                  "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--resume")
    assert rc == 1 and err == (f"qwen35: error: {out / STATE_FILE}: written by a sharded (FSDP) run of an earlier "
                               "version, which did not save its optimizer state: it cannot be resumed\n"), err


def test_an_adapters_only_folder_names_what_to_load(tmp_path):
    """A quantized base's --out holds adapters alone: loading it says so and names the merged model (it had
    said only that config.json was not found)."""
    import qwen35

    out = tmp_path / "qA"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"base": "/models/base", "quant": "int8", "rank": 2}))
    (out / "lora.safetensors").write_bytes(b"")
    with pytest.raises(Qwen35Error) as e:
        qwen35.load_model(out)
    assert str(e.value) == (f"{out} holds LoRA adapters only (their base: /models/base), not a model: write the "
                            f"merged model with `qwen35 train ... --out {out} --resume --merge bf16` and load "
                            f"{out / 'merged'}")
    (out / "merged").mkdir()
    (out / "merged" / "config.json").write_text("{}")
    with pytest.raises(Qwen35Error) as e:
        qwen35.load_model(out)
    assert str(e.value) == (f"{out} holds LoRA adapters only (their base: /models/base), not a model: load "
                            f"{out / 'merged'}, the merged model")
    # qwen35.load (what `qwen35 generate` / chat / serve call) reads the config itself first: the same words
    with pytest.raises(Qwen35Error) as e2:
        qwen35.load(out)
    assert str(e2.value) == str(e.value)


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


def test_a_run_killed_before_its_first_save_leaves_room_for_a_new_one(chat_model_dir, tmp_path, data, capsys):
    """A run killed (or out of disk) before its first save left metrics.jsonl alone: a new run was refused
    ("continue it with --resume") and --resume found nothing to resume, each sending the user to the other.
    Now nothing of it is taken for a run: a new one starts, with metrics of its own."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    (out / ".saving").mkdir()
    rc, err = run(capsys, "--init-from", str(chat_model_dir), "--data", str(data), "--out", str(out), "--steps", "2",
                  "--seq-len", "32", "--batch-size", "2", "--lr", "1e-4")
    assert rc == 0, err
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2] and json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"] != 9.0
    assert (out / "trainer_state.pt").is_file() and not (out / ".saving").exists()


def test_torchrun_processes_say_a_refusal_once(chat_model_dir, tmp_path, data):
    """Under torchrun, a check before training fails alike in every process: one line says it (every process
    had printed the same line, once per process)."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), "-m", "qwen35.train", "--init-from", str(chat_model_dir), "--data", str(data),
                          "--out", str(tmp_path / "o"), "--lr", "1e-4", "--seq-len", "32", "--steps", "3",
                          "--batch-size", "3"], capture_output=True, text=True, timeout=300)
    said = [line for line in run.stderr.splitlines() if line.startswith("qwen35: error:")]
    assert run.returncode != 0 and said == ["qwen35: error: --batch-size 3 (global) must be a multiple of the 2 "
                                            "processes"], run.stderr[-3000:]
