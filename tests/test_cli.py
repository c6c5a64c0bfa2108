"""The command line as a user drives it: generate (flags, stdin, --json) and the chat REPL in a pty."""

import json
import os
import subprocess
import sys

import pexpect

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen35", *args], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_generate_json_and_flags(chat_model_dir):
    out = run("generate", str(chat_model_dir), "--prompt", "Hello", "--max-tokens", "7", "--temperature", "0",
              "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["tokens"] == 7 and res["finish_reason"] == "length"
    assert {"text", "prefill_tok_s", "decode_tok_s"} <= set(res)
    again = run("generate", str(chat_model_dir), "--max-tokens", "7", "--temperature", "0", "--ignore-eos", "--json",
                stdin="Hello")
    assert json.loads(again.stdout.strip().splitlines()[-1])["text"] == res["text"]
    seeded = [json.loads(run("generate", str(chat_model_dir), "--prompt", "Hi", "--max-tokens", "6", "--seed", "3",
                             "--json").stdout.strip().splitlines()[-1])["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_generate_chat_mode_splits_reasoning(chat_model_dir):
    out = run("generate", str(chat_model_dir), "--prompt", "Hi", "--chat", "--think", "--max-tokens", "5",
              "--temperature", "0", "--ignore-eos", "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["content"] == "" and res["reasoning"] == res["text"].strip()  # </think> never came: all reasoning
    off = run("generate", str(chat_model_dir), "--prompt", "Hi", "--chat", "--no-think", "--max-tokens", "5",
              "--temperature", "0", "--ignore-eos", "--json")
    res = json.loads(off.stdout.strip().splitlines()[-1])
    assert res["reasoning"] == "" and res["content"] == res["text"].strip()


def test_generate_errors_are_clear(tmp_path):
    out = run("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert out.returncode == 1 and "qwen35: error: checkpoint not found" in out.stderr
    out = run("generate", str(tmp_path), "--prompt", "x")
    assert out.returncode == 1 and "config.json not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_info(chat_model_dir):
    out = run("info", str(chat_model_dir), "--context", "1000")
    assert out.returncode == 0 and "parameters" in out.stdout and "KV" in out.stdout


def test_chat_repl_in_a_pty(chat_model_dir):
    child = pexpect.spawn(sys.executable, ["-m", "qwen35", "chat", str(chat_model_dir), "--max-tokens", "6",
                                           "--temperature", "0", "--no-think"], env=ENV, encoding="utf-8",
                          timeout=120)
    child.expect(">>> ")
    child.sendline("Hello")
    child.expect(r"\[(\d+) tokens; prompt (\d+), prefilled (\d+), reused 0\]")
    child.expect(">>> ")
    child.sendline("Once more")
    child.expect(r"prompt (\d+), prefilled (\d+), reused (\d+)\]")
    prompt, prefilled, reused = map(int, child.match.groups())
    assert reused > 0 and prefilled == prompt - reused
    child.expect(">>> ")
    child.sendline('"""first line')
    child.sendline('second line"""')
    child.expect(r"reused (\d+)\]")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(r"\(new conversation\)")
    child.expect(">>> ")
    child.sendline("/max 100000")
    child.expect(">>> ")
    child.sendline("Tell me everything")
    child.expect("Tell me everything\r\n")  # the echo of the line
    child.expect(r"\S", timeout=60)  # the answer is streaming
    child.sendintr()
    child.expect(r"\(interrupted\)")
    child.expect(">>> ")  # back at the prompt, not exited
    assert child.isalive()
    child.sendline("/think maybe")
    child.expect(r"usage: /think on\|off")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
