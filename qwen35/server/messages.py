"""A chat request's messages and tools, checked before the template renders them: known roles, text and image
parts (audio, video and files refused by name), tool results answering a call by id, tool names a parser can
read back, tool_choice naming an offered tool."""

from __future__ import annotations

import re
from typing import Any

from .errors import bad, show

ROLES = ("system", "user", "assistant", "tool")
MEDIA_PARTS = ("image_url", "image", "input_image", "video", "video_url", "input_audio", "audio", "file")
TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # OpenAI's rule plus '.' and ':' (MCP names); no '>' or spaces


def parse_tools(tools: Any, tool_choice: Any) -> tuple[list[dict] | None, Any]:
    """(the tools the template sees, tool_choice), both checked: each tool is {"type": "function",
    "function": {"name", "description"?, "parameters"?}}; tool_choice auto, none, required or
    {"type": "function", "function": {"name"}} naming one of them (then only that tool is offered)."""
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", "'tools' must be a list of tool objects")
        names = set()
        for i, t in enumerate(tools):
            at = f"tools[{i}]"
            if not isinstance(t, dict) or t.get("type", "function") != "function":
                raise bad(at, f"'{at}' must be an object {{\"type\": \"function\", \"function\": {{...}}}}")
            fn = t.get("function")
            if not isinstance(fn, dict):
                raise bad(f"{at}.function", f"'{at}.function' must be an object with a 'name'")
            name = fn.get("name")
            if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
                raise bad(f"{at}.function.name", f"'{at}.function.name' must be 1 to 64 letters, digits or _ . : -, "
                          f"got {show(name)}")
            if name in names:
                raise bad(f"{at}.function.name", f"two tools are named {name!r}")
            names.add(name)
            if not isinstance(fn.get("description", ""), str):
                raise bad(f"{at}.function.description", f"'{at}.function.description' must be a string")
            if not isinstance(fn.get("parameters", {}), dict):
                raise bad(f"{at}.function.parameters", f"'{at}.function.parameters' must be a JSON Schema object")
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise bad("tool_choice", "'tool_choice' must be auto, none, required or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        chosen = [t for t in tools or () if t["function"]["name"] == name]
        if not chosen:
            raise bad("tool_choice", f"'tool_choice' names function {name!r}, which is not in 'tools'")
        return chosen, tool_choice
    if tool_choice not in ("auto", "none", "required"):
        raise bad("tool_choice", "'tool_choice' must be auto, none, required or a named function")
    if tool_choice == "required" and not tools:
        raise bad("tool_choice", "'tool_choice' is 'required' but the request has no 'tools'")
    return (None if tool_choice == "none" else tools or None), tool_choice


def parse_messages(messages: Any) -> list[dict]:
    """The chat messages, checked: a known role each, text content (a string, text parts and image_url parts,
    whose URLs server/images.py checks), tool messages answer a call by id, assistant tool calls name a
    function. "developer" (OpenAI's newer name) is taken as "system". Returns a copy safe to render."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(at, f"'{at}' must be an object with a 'role'")
        role = m.get("role")
        if role == "developer":
            m = {**m, "role": "system"}
            role = "system"
        if role not in ROLES:
            raise bad(f"{at}.role", f"'{at}.role' must be one of {', '.join(ROLES)} (or developer), "
                      f"got {show(role)}")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise bad(f"{at}.content", f"'{at}.content' is missing (only an assistant turn may omit it)")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{at}.content[{j}]")
        elif not isinstance(content, str):
            raise bad(f"{at}.content", f"'{at}.content' must be a string or a list of text parts")
        if role == "tool" and not (isinstance(m.get("tool_call_id"), str) and m["tool_call_id"]):
            raise bad(f"{at}.tool_call_id", f"'{at}' is a tool result without a 'tool_call_id'")
        for key in ("name", "reasoning_content", "reasoning", "thinking"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise bad(f"{at}.{key}", f"'{at}.{key}' must be a string")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise bad(f"{at}.tool_calls", f"'{at}.tool_calls' must be a list, on an assistant message")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not TOOL_NAME.fullmatch(fn["name"]):
                    raise bad(f"{at}.tool_calls[{j}]", f"'{at}.tool_calls[{j}]' must be "
                              "{\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
                if not isinstance(fn.get("arguments", {}), (str, dict)):
                    raise bad(f"{at}.tool_calls[{j}].function.arguments",
                              f"'{at}.tool_calls[{j}].function.arguments' must be a JSON string or an object")
        out.append(m)
    return out


def _check_part(part: Any, at: str) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return
    if kind == "image_url":
        return  # its URL is checked and decoded by server/images.py, whose 400s name the part
    if kind in MEDIA_PARTS or (isinstance(part, dict) and any(k in part for k in MEDIA_PARTS)):
        raise bad(at, f"'{at}' is a {kind or 'media'} part: audio, video and files are not supported (images are "
                  "{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/...;base64,...\"}} parts)")
    raise bad(at, f"'{at}' must be a text part {{\"type\": \"text\", \"text\": \"...\"}}")
