"""The command line as a user drives it: generate (flags, stdin, --json) and the chat REPL, its logic
driven in process by scripted input and once for real in a pty."""

import io
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pexpect
import pytest
import torch

import qwen35
from qwen35 import cli

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


def test_generate_structured_output_and_thinking_budget(chat_model_dir, tmp_path):
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["a", "b"], "properties": {
        "a": {"type": "string", "maxLength": 5}, "b": {"enum": ["x", "y"]}}}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    out = run("generate", str(chat_model_dir), "--prompt", "Hi", "--chat", "--think", "--max-thinking-tokens", "5",
              "--json-schema", str(f), "--max-tokens", "120", "--temperature", "1", "--seed", "1", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["finish_reason"] == "stop" and res["reasoning_cut"] == "budget"
    assert "[reasoning cut: the budget of 5 tokens; </think> inserted]" in out.stderr
    jsonschema.validate(json.loads(res["content"]), schema)
    missing = run("generate", str(chat_model_dir), "--prompt", "Hi", "--json-schema", str(tmp_path / "no.json"))
    assert missing.returncode == 1 and "--json-schema" in missing.stderr and "cannot read it" in missing.stderr
    f.write_text("{nope")
    broken = run("generate", str(chat_model_dir), "--prompt", "Hi", "--json-schema", str(f))
    assert broken.returncode == 1 and "not valid JSON" in broken.stderr and "Traceback" not in broken.stderr


def test_generate_errors_are_clear(tmp_path):
    out = run("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert out.returncode == 1 and "qwen35: error: checkpoint not found" in out.stderr
    out = run("generate", str(tmp_path), "--prompt", "x")
    assert out.returncode == 1 and "config.json not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_info(chat_model_dir):
    out = run("info", str(chat_model_dir), "--context", "1000")
    assert out.returncode == 0 and "parameters" in out.stdout and "KV" in out.stdout


class ScriptedStdin(io.StringIO):
    """Lines typed at the REPL; a KeyboardInterrupt in the list is Ctrl-C at that prompt."""

    def __init__(self, lines):
        super().__init__()
        self.lines = list(lines)

    def readline(self, size=-1):
        if not self.lines:
            return ""  # end of input: Ctrl-D
        line = self.lines.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line + "\n"


STATS = re.compile(r"\n\[(\d+) tokens; prompt (\d+), prefilled (\d+), reused (\d+)\]\n")


@pytest.fixture()
def repl(chat_model_dir, monkeypatch, capsys):
    """Run `qwen35 chat` in this process on scripted input (no terminal, no clock): returns a function
    lines -> (exit code, everything printed, [(generated, prompt, prefilled, reused) per answer])."""
    from qwen35.commands import chat

    model, tok = qwen35.load(chat_model_dir, dtype=torch.float32)
    # the command's loader also sets process-wide threads and switches kernels off; the test keeps those
    monkeypatch.setattr(chat, "load_from_args", lambda args: (model, tok))

    def run(lines, *flags):
        monkeypatch.setattr(sys, "stdin", ScriptedStdin(lines))
        code = cli.main(["chat", str(chat_model_dir), "--max-tokens", "6", "--temperature", "0", "--no-think",
                         *flags])
        out = capsys.readouterr().out
        return code, out, [tuple(map(int, m)) for m in STATS.findall(out)]

    run.model, run.tok = model, tok
    return run


def answer_params(thinking=False, max_tokens=6):
    """What the REPL samples with under --temperature 0: the model card's preset, made greedy."""
    from qwen35.session import preset

    return replace(preset(thinking), temperature=0, max_tokens=max_tokens)


def test_read_message_joins_continued_and_quoted_lines(monkeypatch, capsys):
    from qwen35.commands.chat import read_message

    def read(*lines):
        monkeypatch.setattr(sys, "stdin", ScriptedStdin(lines))
        return read_message()

    assert read("plain line", "next") == "plain line"
    assert read("first \\", "second \\", "third") == "first \nsecond \nthird"
    assert read('"""one', "", "two", 'three"""', "after") == "one\n\ntwo\nthree"
    assert read('  """all on one line"""') == "all on one line"
    assert read('"""never closed', "more") == "never closed\nmore"  # Ctrl-D ends the block
    assert read() is None
    # a continuation prompt per line read after the first (the unclosed block asks once more, gets Ctrl-D)
    assert capsys.readouterr().out.count("... ") == 2 + 3 + 2


def test_chat_repl_turns_answer_and_reuse_the_cache(repl):
    code, out, stats = repl(["Hello", "Once more", '"""first line', 'second line"""', "/quit"])
    assert code == 0 and len(stats) == 3 and out.count("... ") == 1  # the quoted block was one message
    tok = repl.tok
    first = tok.chat_template.render([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                     enable_thinking=False)
    generated, prompt, prefilled, reused = stats[0]
    assert (prompt, prefilled, reused) == (len(tok.encode(first)), prompt, 0)
    # the answer printed is the model's greedy answer to the rendered prompt (fp32: the closest choice along
    # it wins by 1.4e-3 logits, far above the rounding between a prefill in one piece or two)
    expected = qwen35.generate(repl.model, tok, first, answer_params())
    assert f">>> {expected}\n[{generated} tokens;" in out and generated == 6
    for (_, before, _, _), (_, prompt, prefilled, reused) in zip(stats, stats[1:]):
        # each turn restores at least the previous prompt and prefills only the rest
        assert reused >= before and prefilled == prompt - reused > 0


def test_chat_repl_commands(repl):
    code, out, stats = repl(["/think maybe", "/max 0", "/max 3", "/nope", "", "Hello", "/reset", "Hello",
                             "/think on", "Hello"])  # then end of input
    assert code == 0
    for msg in ("(usage: /think on|off)", "(usage: /max N, N >= 1)", "(answers up to 3 tokens)",
                "(unknown command /nope; try /reset, /think on|off, /max N, /image PATH, /quit)", "(new conversation)",
                "(thinking on)"):
        assert msg in out, msg
    assert [s[0] for s in stats] == [3, 3, 3]  # /max applies to the answers after it
    assert stats[1][3] == 0 and stats[1][1] == stats[0][1]  # after /reset nothing is reused
    # thinking on: the prompt opens a think block, and this model never closes it within 3 tokens
    before, after = out.split("(thinking on)")
    assert "[thinking] " in after and "[thinking] " not in before


def test_chat_repl_commands_without_arguments(repl):
    """/reset and /quit take no words after them: said so (it was "unknown command"), and not done."""
    code, out, _ = repl(["/quit please", "/reset now", "/quit"])
    assert code == 0 and "(/quit takes no arguments: type /quit alone)" in out  # and the REPL went on:
    assert "(/reset takes no arguments: type /reset alone)" in out
    assert "unknown command" not in out and "(new conversation)" not in out


def test_chat_repl_a_refused_turn_keeps_the_conversation(repl):
    """A turn refused before any work (prompt + max_tokens past the context) is said, and the REPL goes on
    with the history as it was (it had ended the process and lost the conversation); commands match their
    whole first word; /max refuses a count the context cannot hold."""
    ctx = repl.model.config.max_position_embeddings
    code, out, stats = repl(["Hello", "/max 3", "Hello", "/thinking on", f"/max {ctx}"], "--max-tokens", str(ctx - 2))
    assert code == 0 and len(stats) == 1 and stats[0][0] == 3
    assert f"exceeds the context of {ctx} tokens; shorten the prompt or lower max_tokens; nothing was sent)" in out
    first = repl.tok.chat_template.render([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                          enable_thinking=False)
    assert stats[0][1] == len(repl.tok.encode(first))  # the refused turn left nothing in the history
    assert "(unknown command /thinking; try" in out
    assert f"(/max {ctx}: the model's context is {ctx} tokens, prompt included)" in out


def test_chat_repl_ctrl_c(repl, monkeypatch):
    """Ctrl-C at the prompt keeps the REPL; during an answer it stops that answer, which stays in the
    conversation: the next turn's prompt holds it and reuses the cache."""
    import qwen35.session

    code, out, stats = repl([KeyboardInterrupt, "Hello", "/quit"])
    assert code == 0 and "(Ctrl-C: use /quit or Ctrl-D to leave)\n>>> " in out and len(stats) == 1

    real, calls = qwen35.session.generate_step, []

    def first_answer_interrupted(*a, **kw):
        calls.append(1)
        for i, step in enumerate(real(*a, **kw)):
            if i == 2 and len(calls) == 1:
                raise KeyboardInterrupt  # the signal, landing while the model computes
            yield step

    monkeypatch.setattr(qwen35.session, "generate_step", first_answer_interrupted)
    code, out, stats = repl(["Hello", "Again", "/quit"], "--max-tokens", "50")
    assert code == 0 and len(stats) == 2 and stats[0][0] == 2
    partial = out.split(">>> ", 2)[1].split("\n(interrupted)\n[2 tokens;")[0]
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": partial},
               {"role": "user", "content": "Again"}]
    again = repl.tok.chat_template.render(history, add_generation_prompt=True, enable_thinking=False,
                                          preserve_thinking=True)
    assert stats[1][1] == len(repl.tok.encode(again)) and stats[1][3] >= stats[0][1]


def sigint_as_a_terminal_sends_it():
    """For a child that must see Ctrl-C: SIGINT back to its default. A test run started in the background by a
    shell without job control (`.ci/run &` in a script) inherits SIGINT ignored, and Python keeps an ignored
    SIGINT ignored, so the child would never be interrupted (both tests below hung for their whole timeout)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_chat_repl_in_a_pty(chat_model_dir):
    """The REPL as a terminal drives it: prompt, an answer, a real SIGINT mid-answer, /quit. The logic is
    tested above without a terminal; the timeout only catches a hang and is far above any plausible run."""
    child = pexpect.spawn(sys.executable, ["-m", "qwen35", "chat", str(chat_model_dir), "--max-tokens", "6",
                                           "--temperature", "0", "--no-think"], env=ENV, encoding="utf-8",
                          timeout=600, preexec_fn=sigint_as_a_terminal_sends_it)
    child.expect(">>> ")
    child.sendline("Hello")
    child.expect(r"\[6 tokens; prompt (\d+), prefilled (\d+), reused 0\]")
    child.expect(">>> ")
    child.sendline("/max 100000")
    child.expect(">>> ")
    child.sendline("Tell me everything")
    child.expect("Tell me everything\r\n")  # the echo of the line
    child.expect(r"\S")  # the answer is streaming
    child.sendintr()
    child.expect(r"\(interrupted\)")
    child.expect(">>> ")  # back at the prompt, not exited
    assert child.isalive()
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


BAD_FLAGS = [
    (["serve", "--max-batch", "0"], "--max-batch"), (["serve", "--max-queue", "0"], "--max-queue"),
    (["serve", "--port", "99999"], "--port"), (["serve", "--max-request-bytes", "0"], "--max-request-bytes"),
    (["generate", "--threads", "0"], "--threads"), (["generate", "--threads", "-2"], "--threads"),
    (["generate", "--prefill-chunk", "0"], "--prefill-chunk"), (["generate", "--seed", str(2**64)], "--seed"),
    (["generate", "--prompt", ""], "--prompt"), (["bench", "m", "--prompt-tokens", "0"], "--prompt-tokens"),
    (["generate", "--temperature", "inf"], "--temperature"), (["chat", "--top-p", "nan"], "--top-p"),
    (["info", "m", "--context", "-5"], "--context"), (["generate", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--max-thinking-tokens", "-1"], "--max-thinking-tokens"),
    (["generate", "--json-object", "--regex", "a"], "--regex"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_at_start(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"argument {flag}:" in err and "Traceback" not in err


def test_empty_stdin_prompt_is_an_error():
    out = run("generate", "--max-tokens", "2", stdin="  \n")
    assert out.returncode == 1 and out.stderr.strip() == \
        "qwen35: error: the prompt is empty (pass --prompt TEXT or pipe text to stdin)"


def test_output_piped_to_a_reader_that_leaves(chat_model_dir):
    """`qwen35 generate ... | head -c 1`: the reader goes away mid-answer; no traceback, exit 141."""
    p = subprocess.Popen([sys.executable, "-m", "qwen35", "generate", str(chat_model_dir), "--prompt", "Hello",
                          "--max-tokens", "100000", "--ignore-eos", "--temperature", "0"], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_as_a_terminal_sends_it)
    assert p.stdout.read(1)
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_ctrl_c_during_generate(chat_model_dir):
    import signal

    p = subprocess.Popen([sys.executable, "-m", "qwen35", "generate", str(chat_model_dir), "--prompt", "Hello",
                          "--max-tokens", "100000", "--ignore-eos", "--temperature", "0"], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_as_a_terminal_sends_it)
    assert p.stdout.read(1)  # generating
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
