"""Chat interactively; the cache is kept across turns and only each new turn is prefilled.

Commands: /reset (new conversation), /think on|off, /max N (answer length), /image PATH (a picture for the
next message; vision-language checkpoints), /quit. End a line with \\ to continue it on the next,
or wrap a block in triple quotes (\"\"\"). Ctrl-C interrupts an answer and returns to the prompt; Ctrl-D
or /quit leaves.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import Qwen35Error
from .common import (
    add_model_args,
    add_sampling_args,
    add_speculative_args,
    check_sampling_flags,
    check_speculative_flags,
    check_utf8,
    load_from_args,
    sampling_from_args,
    speculation_from_args,
    structured_from_args,
    utf8,
)

DIM, RESET = "\033[2m", "\033[0m"


def setup_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", type=utf8, default=None, help="system message")
    p.add_argument("--no-preserve-thinking", dest="preserve_thinking", action="store_false", default=True,
                   help="render past answers without their think block (each turn then re-prefills the last answer)")
    p.add_argument("--verbose", action="store_true", help="after each answer, its speeds and speculative acceptance")
    add_sampling_args(p)
    add_speculative_args(p)


def read_message(prompt: str = ">>> ") -> str | None:
    """One user message (None at end of input). Handles \\ continuations and \"\"\" blocks."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            try:
                lines.append(input("... "))
            except EOFError:
                break
        lines[-1] = lines[-1].rstrip()[:-3] if lines[-1].rstrip().endswith('"""') else lines[-1]
        return "\n".join(lines).strip()
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


def attach_image(model, path: str, pending: list) -> str:
    """/image PATH: check the picture now (a bad path is a message, not a crash) and queue it prepared."""
    from ..errors import Qwen35Error
    from ..multimodal import prepare_images

    if not path:
        return "usage: /image PATH (the picture goes with your next message)"
    try:
        pending += prepare_images(model, [path])
    except Qwen35Error as e:
        return f"cannot use the image: {e}"
    return f"image {path} attached to your next message ({len(pending)} waiting)"


def main(args: argparse.Namespace) -> int:
    from ..generation import max_context
    from ..sampling import preset
    from ..session import ChatSession

    check_speculative_flags(args)
    check_sampling_flags(args)
    structured_from_args(args)  # an unreadable --json-schema / --grammar: now, not at the first message
    model, tokenizer = load_from_args(args)
    tty = sys.stdout.isatty()
    spec = speculation_from_args(args, tokenizer)
    session = ChatSession(model, tokenizer, system=args.system, enable_thinking=args.think,
                          preserve_thinking=args.preserve_thinking, speculation=spec)

    def params_for(thinking: bool):
        return sampling_from_args(args, preset(thinking))

    print("qwen35 chat: /reset, /think on|off, /max N, /image PATH, /quit; Ctrl-C stops an answer, Ctrl-D exits.",
          flush=True)
    pending: list = []  # pictures attached (/image) to the next message
    while True:
        try:
            text = read_message()
            if text is not None:
                check_utf8(text, "that message")
        except KeyboardInterrupt:
            print("\n(Ctrl-C: use /quit or Ctrl-D to leave)", flush=True)
            continue
        except UnicodeDecodeError as e:  # stdin decoded strictly: the line never became text
            print(f"(that message is not valid UTF-8 text ({e.reason}); nothing was sent)", flush=True)
            continue
        except Qwen35Error as e:  # decoded with surrogateescape: one bad line must not end the session
            print(f"({e}; nothing was sent)", flush=True)
            continue
        if text is None or text.strip() == "/quit":
            print(flush=True)
            return 0
        cmd = text.strip()
        if not cmd:
            continue
        if cmd == "/reset":
            session.reset()
            print("(new conversation)", flush=True)
            continue
        word = cmd.split()[0]  # a command is its first word, exactly: "/thinking on" is no "/think on"
        if word in ("/reset", "/quit"):  # with words after it ("/reset now"): said, not done
            print(f"({word} takes no arguments: type {word} alone)", flush=True)
            continue
        if word == "/think":
            arg = cmd.split()[1] if len(cmd.split()) > 1 else ""
            if arg not in ("on", "off"):
                print("(usage: /think on|off)", flush=True)
                continue
            session.enable_thinking = arg == "on"
            print(f"(thinking {arg})", flush=True)
            continue
        if word == "/max":
            parts = cmd.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) < 1:
                print("(usage: /max N, N >= 1)", flush=True)
                continue
            if int(parts[1]) >= max_context(model):
                print(f"(/max {parts[1]}: the model's context is {max_context(model)} tokens, prompt included)",
                      flush=True)
                continue
            args.max_tokens = int(parts[1])
            print(f"(answers up to {args.max_tokens} tokens)", flush=True)
            continue
        if word == "/image":
            msg = attach_image(model, cmd[len("/image"):].strip(), pending)
            print(f"({msg})", flush=True)
            continue
        if cmd.startswith("/"):
            print(f"(unknown command {cmd.split()[0]}; try /reset, /think on|off, /max N, /image PATH, /quit)",
                  flush=True)
            continue
        thinking = session.enable_thinking if session.enable_thinking is not None else True
        session.params = params_for(thinking)
        in_reasoning = False
        t0 = time.perf_counter()
        images, pending = pending, []
        n_messages = len(session.messages)
        try:
            for ev in session.send(text, images=images):
                if ev.kind == "reasoning":
                    if not in_reasoning:
                        sys.stdout.write(DIM + "thinking: " if tty else "[thinking] ")
                        in_reasoning = True
                    sys.stdout.write(ev.text)
                elif ev.kind in ("content", "tool_call"):
                    if in_reasoning:
                        sys.stdout.write(RESET + "\n" if tty else "\n[answer] ")
                        in_reasoning = False
                    sys.stdout.write(ev.text if ev.kind == "content" else f"[tool call] {ev.call.name}"
                                                                          f"({ev.call.arguments_json()})")
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write((RESET if tty else "") + "\n(interrupted)")
        except Qwen35Error as e:  # a turn refused (too long for the context, a bad image): the conversation goes on
            sent = len(session.messages) > n_messages  # a refused turn leaves the history as it was
            if not sent:
                pending = images  # the pictures wait for the next message
            print(f"{RESET if tty and in_reasoning else ''}\n({e}{'' if sent else '; nothing was sent'})", flush=True)
            continue
        if in_reasoning and tty:
            sys.stdout.write(RESET)
        st = session.last
        cut = f"; reasoning cut at the {'budget' if st.reasoning_cut == 'budget' else 'loop'}" \
            if st.reasoning_cut else ""
        sys.stdout.write(f"\n{DIM if tty else ''}[{st.generated_tokens} tokens; prompt {st.prompt_tokens}, "
                         f"prefilled {st.prefilled_tokens}, reused {st.cached_tokens}{cut}]{RESET if tty else ''}\n")
        if args.verbose:
            line = f"[{st.generated_tokens / (time.perf_counter() - t0):.2f} tok/s including prefill"
            line += f"; {spec.last.summary()}]" if spec is not None else "]"
            sys.stdout.write(f"{DIM if tty else ''}{line}{RESET if tty else ''}\n")
        sys.stdout.flush()
