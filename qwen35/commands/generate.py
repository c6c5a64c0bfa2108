"""Generate text from a prompt (--prompt or stdin), streamed to the terminal.

With --chat the prompt becomes a user turn in the model's chat template; reasoning is shown apart from the
answer. --json ends with one JSON object: text, tokens, prefill_tok_s, decode_tok_s and more.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import Qwen35Error
from .common import (
    POSITIVE,
    add_model_args,
    add_sampling_args,
    add_speculative_args,
    check_sampling_flags,
    check_speculative_flags,
    load_from_args,
    nonempty,
    read_stdin,
    refuse,
    sampling_from_args,
    speculation_from_args,
    structured_from_args,
    utf8,
)

IMAGE_PAD = "<|image_pad|>"
IMAGE_PART = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"  # what the chat template writes for an image part
VIDEO_PAD = "<|video_pad|>"
VIDEO_PART = f"<|vision_start|>{VIDEO_PAD}<|vision_end|>"


def setup_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", type=nonempty, default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--system", type=utf8, default=None, help="system message (with --chat)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file for the prompt (repeatable, in order): with --chat each goes before the "
                        "text in the user turn; without, the prompt's <|image_pad|> placeholders take them, or "
                        "they are put before the prompt when it has none")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="an animated GIF/WebP/PNG as a video (repeatable; with --chat, after the images); sampled "
                        "at 2 frames per second")
    p.add_argument("--prefill-chunk", type=POSITIVE, default=512)
    p.add_argument("--json", action="store_true", help="end with one JSON line (text, token_ids, speeds, ...)")
    p.add_argument("--verbose", action="store_true", help="print speeds (and speculative acceptance) to stderr")
    add_sampling_args(p)
    add_speculative_args(p)


def main(args: argparse.Namespace) -> int:
    from ..api import stream_generate
    from ..sampling import preset
    from ..toolcalls import OutputParser, ParsedDelta

    check_speculative_flags(args)
    check_sampling_flags(args)
    if args.system is not None and not args.chat:  # without the chat template there is no system turn to fill
        refuse(args, "--system needs --chat")
    prompt = args.prompt if args.prompt is not None else read_stdin("the prompt on stdin")
    if not prompt.strip():
        raise Qwen35Error("the prompt is empty (pass --prompt TEXT or pipe text to stdin)")
    if args.image or args.video:  # a missing or unreadable picture fails here, before the weights are read
        from ..vision_input import open_image

        for path in args.image + args.video:
            open_image(path)
    structured_from_args(args)  # a bad --json-schema / --grammar file: before the weights are read
    model, tokenizer = load_from_args(args)
    spec = speculation_from_args(args, tokenizer)
    thinking = bool(args.think)
    if args.chat:
        media = [{"type": "image"} for _ in args.image] + [{"type": "video"} for _ in args.video]
        content = [*media, {"type": "text", "text": prompt}] if media else prompt
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": content}]
        # the prompt's text as text: a typed "<|im_end|>" is characters, as in chat and the server
        pieces = tokenizer.chat_template.render_segments(messages, tokenizer.added_tokens, add_generation_prompt=True,
                                                         enable_thinking=args.think)
        thinking = "".join(text for text, _ in pieces).rstrip().endswith("<think>")
        prompt = tokenizer.encode_segments(pieces)
    elif (args.image or args.video) and IMAGE_PAD not in prompt and VIDEO_PAD not in prompt:
        prompt = IMAGE_PART * len(args.image) + VIDEO_PART * len(args.video) + prompt
    params = sampling_from_args(args, preset(thinking))
    tty = sys.stdout.isatty()
    parser = OutputParser(thinking_open=thinking) if args.chat else None
    parsed = ParsedDelta()
    text, token_ids, last, in_reasoning, cut = [], [], None, False, None
    for r in stream_generate(model, tokenizer, prompt, params, prefill_chunk_size=args.prefill_chunk,
                             speculative=spec, images=args.image or None, videos=args.video or None):
        last = r
        token_ids.append(r.token)
        if r.reasoning_cut:
            cut = r.reasoning_cut
            why = f"the budget of {params.max_thinking_tokens} tokens" if cut == "budget" else "a reasoning loop"
            print(f"[reasoning cut: {why}; </think> inserted]", file=sys.stderr, flush=True)
        piece = r.text
        text.append(piece)
        if parser is None:
            sys.stdout.write(piece)
        else:
            d = parser.feed(piece)
            if r.finish_reason:
                d += parser.finish()
            parsed += d
            if d.reasoning:
                if not in_reasoning:
                    sys.stdout.write("\033[2m" if tty else "[thinking] ")
                    in_reasoning = True
                sys.stdout.write(d.reasoning)
            if d.content or d.tool_calls:
                if in_reasoning:
                    sys.stdout.write("\033[0m\n" if tty else "\n[answer] ")
                    in_reasoning = False
                sys.stdout.write(d.content)
                for c in d.tool_calls:
                    sys.stdout.write(f"\n[tool call] {c.name}({c.arguments_json()})")
        sys.stdout.flush()
    if in_reasoning and tty:
        sys.stdout.write("\033[0m")
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        sys.stdout.flush()
        print(f"[{last.generation_tokens} tokens, prompt {last.prompt_tokens}; prefill {last.prefill_tok_s:.1f} tok/s, "
              f"decode {last.decode_tok_s:.2f} tok/s]", file=sys.stderr)
        if spec is not None:
            print(f"[{spec.last.summary()}]", file=sys.stderr)
    if args.json and last is not None:
        out = {"text": "".join(text), "token_ids": token_ids, "tokens": last.generation_tokens,
               "prompt_tokens": last.prompt_tokens,
               "finish_reason": last.finish_reason, "prefill_tok_s": round(last.prefill_tok_s, 2),
               "decode_tok_s": round(last.decode_tok_s, 2), "peak_rss_mb": round(last.peak_rss_mb, 1),
               "reasoning_cut": cut}
        if spec is not None:
            out["speculative"] = spec.last.as_dict()
        if parser is not None:
            out.update(reasoning=parsed.reasoning, content=parsed.content,
                       tool_calls=[{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls])
        print(json.dumps(out, ensure_ascii=False))
    return 0
