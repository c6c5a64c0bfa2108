"""Training runs that stop and go on: a save is all or nothing (a kill at any point of it resumes the run
exactly), a resume logs each step once, and data-parallel runs train beside an MTP head whose loss is off.

Nothing at module level imports transformers (tests/replica.py does): the data-parallel workers import this
module again in their own processes."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwen35
from qwen35.train import process_group, run_state
from qwen35.train.loop import TrainConfig, init_model, train
from qwen35.train.run_state import SAVED, SAVING, STATE_FILE, load_state


def shards(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("model.safetensors-*.safetensors")) for k, v in load_file(f).items()}


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


CFG = TrainConfig(steps=4, seq_len=64, batch_size=2, lr=3e-3, warmup=1, save_every=2)


@pytest.fixture
def straight(tmp_path):
    """(rows, out, losses) of an uninterrupted run: the reference an interrupted one must reproduce."""
    from test_train import corpus_rows, small_config

    rows = corpus_rows()
    losses = train(init_model(small_config(), seed=1), rows, CFG, tmp_path / "a", log=lambda s: None)
    return rows, tmp_path / "a", losses


def test_a_kill_while_a_save_is_written_leaves_the_previous_step(straight, tmp_path, monkeypatch):
    """Killed after the weights of step 4 were written but before its trainer state: the run still holds step 2
    whole (it had held step-4 weights beside the step-2 optimizer, and resumed from the mix without a word),
    so resuming gives the uninterrupted run's weights bit for bit; the user's files in --out stay."""
    from test_train import small_config

    rows, a, losses = straight
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real, saves = torch.save, []

    def killed_at_the_second_state(obj, f, *args, **kwargs):
        if str(f).endswith(STATE_FILE):
            saves.append(obj["step"])
            if len(saves) == 2:
                raise KeyboardInterrupt  # as a kill: nothing after it runs
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_at_the_second_state)
    with pytest.raises(KeyboardInterrupt):
        train(init_model(small_config(), seed=1), rows, CFG, out, log=lambda s: None)
    monkeypatch.setattr(torch, "save", real)
    assert saves == [2, 4]
    state = load_state(out)
    assert state["step"] == 2
    resumed = train(qwen35.load_model(out), rows, CFG, out, resume=state, log=lambda s: None)
    assert resumed == losses
    ref = shards(a)
    got = shards(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert (out / "notes.txt").read_text() == "mine" and not (out / SAVING).exists()
    assert steps_logged(out) == [1, 2, 3, 4]  # steps 3 and 4 of the killed run are not logged twice


def test_a_kill_while_a_save_is_moved_in_is_finished_on_resume(straight, tmp_path, monkeypatch):
    """Killed after the step-4 checkpoint was written whole, while its files replaced step 2's: the next
    load_state moves the rest in, and the folder equals the uninterrupted run's (the weights of one step, the
    trainer state of the other, had it stayed half moved)."""
    from test_train import small_config

    rows, a, _ = straight
    out = tmp_path / "b"
    real, moved = os.replace, []

    def killed_after_one_move(src, dst):
        if Path(src).parent.name == SAVED:
            if moved:
                raise KeyboardInterrupt
            moved.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(run_state.os, "replace", lambda src, dst: killed_after_one_move(src, dst))
    cfg = TrainConfig(**{**CFG.__dict__, "save_every": 0})  # one save, at the end: step 4
    with pytest.raises(KeyboardInterrupt):
        train(init_model(small_config(), seed=1), rows, cfg, out, log=lambda s: None)
    monkeypatch.setattr(run_state.os, "replace", real)
    assert len(moved) == 1 and (out / SAVED).is_dir() and not (out / STATE_FILE).exists()
    state = load_state(out)
    assert state["step"] == 4 and not (out / SAVED).exists()
    assert state["losses"] == torch.load(a / STATE_FILE, weights_only=False)["losses"]
    ref, got = shards(a), shards(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_resume_cuts_the_metrics_logged_after_the_saved_step(tmp_path):
    """The lines of steps a killed run logged after its last save (and one it left half written) go; the
    resumed run logs those steps again, once each."""
    from qwen35.train.run_state import cut_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    cut_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"


def _ddp_worker(rank: int, store: str, config, rows: dict, out: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=120))
    try:
        logs = {}
        for name, seq_len, weight in (("off", 16, 0.0), ("short", 2, 0.3)):
            cfg = TrainConfig(steps=2, seq_len=seq_len, batch_size=2, lr=3e-3, warmup=1, mtp_weight=weight)
            logs[name] = []
            train(init_model(config, seed=0), rows[seq_len], cfg, out / name, log=logs[name].append)
        cfg = TrainConfig(steps=3, seq_len=16, batch_size=2, lr=3e-3, warmup=1, mtp_weight=0.0)
        logs["resumed"] = []
        train(qwen35.load_model(out / "off"), rows[16], cfg, out / "off", resume=True, log=logs["resumed"].append)
        (out / f"log{rank}.json").write_text(json.dumps(logs))
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    process_group.leave(0)  # not through Python's shutdown beside gloo's threads: process_group says why


def test_ddp_trains_beside_an_mtp_head_without_its_loss(tmp_path):
    """Under DDP a model with an MTP head trains with --mtp-weight 0, and with rows too short for a token
    after next (the head's parameters had got no gradient, and DDP stopped at step 2 waiting for them); the
    head is saved as it was, and "resumed at step" is logged by rank 0 alone."""
    import replica
    from test_train import corpus_rows

    from qwen35.config import ModelConfig

    config = ModelConfig.from_hf({**replica.text_config(2, tie=True), "model_type": "qwen3_5_text",
                                  "num_hidden_layers": 4, "mtp_num_hidden_layers": 1})
    rows = {16: corpus_rows(16), 2: corpus_rows(2)}
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "store"), config, rows, tmp_path), nprocs=2)
    initial = dict(init_model(config, seed=0).named_parameters())
    for name in ("off", "short"):
        saved = shards(tmp_path / name)
        head = [k for k in saved if k.startswith("mtp.")]
        assert head and all(torch.equal(saved[k], initial[k]) for k in head), name
        assert not torch.equal(saved["model.norm.weight"], initial["model.norm.weight"])  # the rest trained
    zero, one = (json.loads((tmp_path / f"log{r}.json").read_text()) for r in (0, 1))
    assert one == {"off": [], "short": [], "resumed": []}
    assert zero["resumed"][0] == "resumed at step 2" and len(zero["resumed"]) == 2
    assert zero["short"][0] == "--seq-len 2 leaves no token after next: the MTP head is not trained"
    assert all("mtp_loss" not in line for line in zero["off"] + zero["short"])
