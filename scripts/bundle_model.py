"""Evaluate the trained bundled model and package it into qwen35/assets/model (bf16, official layout).

Reports (written to qwen35/assets/model/model_card.json and printed): parameters, data, tokens seen, training
time (from the run's own tokens/s), held-out loss of the pretrained and chat models vs a unigram baseline of
the same tokenizer, MTP head accuracy (its draft equals the token after next), and greedy samples.

    python scripts/bundle_model.py WORK_DIR
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

import qwen35
from qwen35.checkpoint import write_checkpoint
from qwen35.tokenizer import Tokenizer
from qwen35.train.data import IGNORE, pack, read_documents
from qwen35.train.loop import evaluate
from qwen35.train.run_state import config_dict

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "qwen35" / "assets" / "model"


def run_stats(run: Path) -> dict:
    state = torch.load(run / "trainer_state.pt", weights_only=False)
    cfg = state["config"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "tok_s" in m][-1]
    tokens = state["step"] * cfg["batch_size"] * cfg["grad_accum"] * cfg["seq_len"]
    return {"steps": state["step"], "tokens": tokens, "seconds": round(tokens / last["tok_s"]),
            "final_train_loss": round(state["losses"][-1], 4)}


def unigram_loss(train_docs, held_rows, vocab: int) -> float:
    counts = Counter(t for d in train_docs for t in d.ids)
    total = sum(counts.values()) + vocab  # add-one smoothing
    nll, n = 0.0, 0
    for r in held_rows:
        for t in r.labels.tolist():
            if t != IGNORE:
                nll -= math.log((counts.get(t, 0) + 1) / total)
                n += 1
    return nll / n


def mtp_accuracy(model, rows) -> float:
    hits = n = 0
    with torch.no_grad():
        for r in rows:
            ids, seg = r.ids[None], r.segments[None]
            hidden = model.hidden_states(ids, segments=seg)
            logits, _ = model.mtp_forward(hidden[:, :-2], ids[:, 1:-1], segments=seg[:, :-2])
            ok = (seg[:, 2:] == seg[:, :-2]) & (seg[:, :-2] >= 0)
            hits += int(((logits.argmax(-1) == ids[:, 2:]) & ok).sum())
            n += int(ok.sum())
    return hits / max(1, n)


def main() -> None:
    work = Path(sys.argv[1])
    tok = Tokenizer(work)
    from qwen35.chat_template import ChatTemplate

    tok.chat_template = ChatTemplate.from_model_dir(work)
    base = qwen35.load_model(work / "base")
    chat = qwen35.load_model(work / "chat")
    train_docs = read_documents(work.joinpath("train_files.txt").read_text().split(), tok)
    held = pack(read_documents(work.joinpath("heldout_files.txt").read_text().split(), tok), 256)
    card = {
        "parameters": sum(p.numel() for p in chat.parameters()),
        "parameters_without_mtp": sum(p.numel() for n, p in chat.named_parameters() if not n.startswith("mtp.")),
        "layers": list(chat.config.layer_types), "hidden_size": chat.config.hidden_size,
        "vocab_size": chat.config.vocab_size,
        "data": "Python 3.11 standard library source (PSF License 2.0): "
                f"{len(train_docs)} training files, {len(held)} held-out rows of 256 tokens",
        "pretrain": run_stats(work / "base"), "chat_finetune": run_stats(work / "chat"),
        "heldout_loss_pretrained": round(evaluate(base, held), 4),
        "heldout_loss_chat": round(evaluate(chat, held), 4),
        "heldout_loss_unigram_baseline": round(unigram_loss(train_docs, held, chat.config.vocab_size), 4),
        "mtp_accuracy_heldout": round(mtp_accuracy(chat, held[:32]), 4),
    }
    greedy = qwen35.SamplingParams(temperature=0, max_tokens=60)
    samples = {}
    for prompt in ("def read_lines(path):\n", "import os\n\n\nclass "):
        samples[prompt] = qwen35.generate(chat, tok, prompt, greedy)
    for ask in ("Write a Python function `is_even`: Return True if n is even.",
                "What is the weather in Paris?"):
        tools = None
        if "weather" in ask:
            tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                     "required": ["city"]}}}]
        prompt = tok.chat_template.render([{"role": "user", "content": ask}], tools=tools, enable_thinking=False)
        samples["chat: " + ask] = qwen35.generate(chat, tok, prompt, greedy)
    card["samples"] = samples

    if ASSET.exists():
        shutil.rmtree(ASSET)
    tensors = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in chat.named_parameters()}
    for name in ("A_log", "linear_attn.norm.weight"):  # kept in F32 like the official checkpoints
        for n in tensors:
            if n.endswith(name):
                tensors[n] = chat.get_parameter(n).detach().float().contiguous()
    write_checkpoint(tensors, config_dict(chat.config), ASSET)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / f, ASSET / f)
    (ASSET / "model_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    size = sum(f.stat().st_size for f in ASSET.iterdir()) / 2**20
    card["size_mib"] = round(size, 2)
    (ASSET / "model_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(card, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
