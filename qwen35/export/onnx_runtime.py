"""Driving an exported model with onnxruntime from Python: `OnnxModel` (the tests, the benchmark, and a
worked example of the manifest's contract that the web worker follows in JavaScript)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .onnx import ExportError, cache_zeros


class _Sessions(dict):
    """Graph name -> onnxruntime session, opened on first use: each session holds its own copy of the weights
    (and of their prepacked forms), so a driver that runs every step through the prefill graph opens one."""

    def __init__(self, open_session):
        super().__init__()
        self._open = open_session

    def __missing__(self, name: str):
        session = self[name] = self._open(name)
        return session


class OnnxModel:
    """OnnxModel(OUT_DIR): the sessions of an `export-onnx` directory (`sessions[graph]`, opened when first
    used). threads: onnxruntime intra-op threads (None: its default, one per core)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise ExportError(f"{self.path}: no manifest.json (not a qwen35 export-onnx directory)")
        self.manifest = json.loads(mf.read_text())
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        graphs = self.manifest["graphs"]
        self.sessions = _Sessions(lambda name: ort.InferenceSession(str(self.path / graphs[name]["file"]), opts,
                                                                    providers=["CPUExecutionProvider"]))
        self.cache_names = [i["name"][len("past."):] for i in self.manifest["inputs"]
                            if i["name"].startswith("past.")]

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        return cache_zeros(self.manifest, batch)

    def step(self, graph: str, ids: np.ndarray, cache: dict[str, np.ndarray]):
        """Run `graph` ("prefill" or "decode") on ids [B, T]; returns (logits [B, vocab], new cache)."""
        out = self.sessions[graph].run(None, {"input_ids": ids.astype(np.int64), **cache})
        return out[0], {f"past.{n}": v for n, v in zip(self.cache_names, out[1:])}

    def prefill(self, ids: np.ndarray, cache=None, chunk: int = 512):
        """ids [B, T] in chunks of `chunk` tokens through the prefill graph (T >= 1: the logits are the last
        token's)."""
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ExportError(f"the prompt must be token ids [batch, T >= 1], got shape {list(ids.shape)} (an "
                              "empty prompt has no last token to give logits for)")
        cache = self.empty_cache(ids.shape[0]) if cache is None else cache
        for s in range(0, ids.shape[1], chunk):
            logits, cache = self.step("prefill", ids[:, s : s + chunk], cache)
        return logits, cache

    def greedy(self, prompt_ids: list[int], max_tokens: int, chunk: int = 512, stop: bool = True,
               graph: str = "prefill") -> list[int]:
        """Greedy continuation of one prompt: the prefill graph for the prompt, then `graph` per token; stops
        after an EOS id (included) unless stop=False. The prefill graph takes one token as well as the decode
        graph (which only leaves out the causal mask) and was no slower (0.8B int8: 11.7 against 10.6 tok/s,
        the same tokens), so by default one session, holding the weights once, runs everything."""
        eos = set(self.manifest["eos_token_ids"]) if stop else set()
        logits, cache = self.prefill(np.array([prompt_ids], dtype=np.int64), chunk=chunk)
        out = []
        while len(out) < max_tokens:
            tok = int(logits[0].argmax())
            out.append(tok)
            if tok in eos or len(out) == max_tokens:
                break
            logits, cache = self.step(graph, np.array([[tok]], dtype=np.int64), cache)
        return out
