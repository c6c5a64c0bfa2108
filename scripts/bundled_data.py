"""Build the bundled model's corpus, tokenizer and chat data, offline, from the Python standard library.

Source: the `.py` files of this interpreter's standard library (PSF License 2.0, GPL-compatible and
permissive): top-level modules plus the json, email, http, logging, unittest, xml, asyncio, concurrent and
importlib packages; tests, `site-packages` and generated files are excluded. Cleaning: files decoded as
UTF-8, licence header comments kept as they are, files over 200 KB skipped, every file one document. The
held-out split is every 20th file.

Chat data: for every top-level function with a docstring, the docstring's first sentence becomes the user's
request and the function's source the assistant's answer; plus synthetic tool-call conversations in the
Qwen3.5 XML format.

    python scripts/bundled_data.py OUT_DIR
writes OUT_DIR/{train.txt-files list, heldout list, tokenizer.json, tokenizer_config.json, chat.jsonl}.
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("json", "email", "http", "logging", "unittest", "xml", "asyncio", "concurrent", "importlib",
            "collections", "urllib", "html", "sqlite3", "multiprocessing")
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
           "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
           "</tool_response>", "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>",
           "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>"]
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")


def source_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    for pkg in PACKAGES:
        files += sorted(p for p in (lib / pkg).rglob("*.py") if "test" not in p.parts and "tests" not in p.parts)
    return [f for f in files if f.stat().st_size <= 200_000 and "test" not in f.stem]


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 8192) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CONTROL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False,
        "model_max_length": 262144}, indent=2))


def chat_examples(files: list[Path], seed: int = 0) -> list[dict]:
    out = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                summary = doc.strip().split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")
                source = "\n".join(lines[node.lineno - 1 - len(node.decorator_list): node.end_lineno])
                if 20 <= len(summary) <= 200 and len(source) <= 1500:
                    out.append({"messages": [
                        {"role": "user", "content": f"Write a Python function `{node.name}`: {summary}."},
                        {"role": "assistant", "content": f"```python\n{source}\n```"}]})
    r = random.Random(seed)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "search_docs", "description": "Search the Python docs",
                                               "parameters": {"type": "object", "properties": {
                                                   "query": {"type": "string"}}, "required": ["query"]}}}]
    cities = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul", "Lagos"]
    topics = ["json.dumps", "pathlib", "asyncio.gather", "dataclasses", "itertools.chain", "re.sub", "logging"]
    for i in range(300):
        if i % 2:
            city = r.choice(cities)
            call, ask, result = ("get_weather", {"city": city}, f"What is the weather in {city}?"), None, None
            result = f"{r.randint(-5, 35)} C, {r.choice(['sunny', 'cloudy', 'rain'])}"
            answer = f"It is {result} in {city}."
            q = call[2]
        else:
            topic = r.choice(topics)
            call = ("search_docs", {"query": topic}, f"How do I use {topic}?")
            result = f"{topic}: see the standard library reference."
            answer = f"Here is what the documentation says: {result}"
            q = call[2]
        out.append({"tools": tools, "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": call[0], "arguments": call[1]}}]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": answer}]})
    r.shuffle(out)
    return out


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    files = source_files()
    heldout = files[::20]
    train = [f for f in files if f not in set(heldout)]
    (out / "train_files.txt").write_text("\n".join(map(str, train)) + "\n")
    (out / "heldout_files.txt").write_text("\n".join(map(str, heldout)) + "\n")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in train]
    train_tokenizer(texts, out)
    chats = chat_examples(train)
    with open(out / "chat.jsonl", "w") as fh:
        for c in chats:
            fh.write(json.dumps(c) + "\n")
    size = sum(len(t.encode()) for t in texts)
    print(f"{len(train)} training files ({size / 2**20:.1f} MiB), {len(heldout)} held out, {len(chats)} chats")


if __name__ == "__main__":
    main()
