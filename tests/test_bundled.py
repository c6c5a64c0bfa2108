"""The bundled model: present, small, loads offline by default, greedy is deterministic, its MTP head runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import qwen35

ASSET = Path(qwen35.__file__).parent / "assets" / "model"


def test_bundled_checkpoint_is_small_and_documented():
    size = sum(f.stat().st_size for f in ASSET.iterdir())
    assert size <= 25 * 2**20
    card = json.loads((ASSET / "model_card.json").read_text())
    assert card["parameters"] <= 30_000_000
    assert card["heldout_loss_pretrained"] < card["heldout_loss_unigram_baseline"] - 1.0
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["mtp_num_hidden_layers"] == 1 and cfg["layer_types"].count("full_attention") * 4 == len(cfg["layer_types"])


def test_greedy_is_deterministic_and_mtp_runs():
    model, tok = qwen35.load(ASSET, dtype=torch.float32)
    greedy = qwen35.SamplingParams(temperature=0, max_tokens=24)
    a = qwen35.generate(model, tok, "def read_lines(path):\n", greedy)
    assert a and a == qwen35.generate(model, tok, "def read_lines(path):\n", greedy)
    ids = torch.tensor([tok.encode("import os\nimport sys\n\n\ndef main():\n    return 0\n")])
    hidden = model.hidden_states(ids)
    logits, h = model.mtp_forward(hidden[:, :-1], ids[:, 1:])
    assert logits.shape == (1, ids.shape[1] - 1, model.config.vocab_size) and torch.isfinite(logits).all()


def test_cli_uses_the_bundled_model_offline():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "qwen35", "generate", "--prompt", "def add(a, b):",
                          "--max-tokens", "32", "--temperature", "0"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 0
