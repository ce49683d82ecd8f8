"""The one validator of records: chat messages, prompts and the lines of the files that carry them.

The HTTP server checks a request's messages with the same functions that every file reader uses for its records,
so "what is a valid conversation" is written once. A problem is a `RecordError` naming where it is (`FILE:LINE`
for a file, `messages[2]` for a request) and which field; the server turns it into a 400 with that field as
OpenAI's `param`, a command prints it as one line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from slmkit.errors import SlmError

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"


class RecordError(SlmError):
    """A record that is not valid: `where` it is and the `field` at fault (OpenAI's `param`)."""

    def __init__(self, where: str, message: str, field: str | None = None):
        super().__init__(f"{where}: {message}")
        self.where, self.field = where, field


def check_message(message, where: str, *, parts=None) -> dict:
    """One chat message as {"role", "content"} with a string content. `parts(part, where)` turns a content part
    that is not text (an image) into text; without it, content must be a string or a list of text parts."""
    if not isinstance(message, dict):
        raise RecordError(where, f"a message must be an object with \"role\" and \"content\", not "
                                 f"{type(message).__name__}", where)
    role = message.get("role")
    if role not in ROLES:
        got = "no role" if role is None else f"got {json.dumps(role)[:40]}"
        raise RecordError(where, f"\"role\" must be one of {', '.join(ROLES)} ({got})", f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(_part_text(part, f"{where}.content[{k}]", parts) for k, part in enumerate(content))
    if not isinstance(content, str):
        raise RecordError(where, "\"content\" must be a string or a list of content parts "
                                 f"(got {type(content).__name__})", f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _part_text(part, where: str, parts) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RecordError(where, "a text part needs a string \"text\"", where)
        return part["text"]
    if kind is not None and parts is not None:
        return parts(part, where)
    raise RecordError(where, "a content part must be {\"type\": \"text\", \"text\": ...}"
                      + (" or an image" if parts is not None else ""), where)


def check_messages(messages, where: str, *, parts=None, need_assistant: bool = False) -> list[dict]:
    """A conversation: a non-empty list of valid messages (`check_message`); `need_assistant` for training data."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(where, "\"messages\" must be a non-empty list of {\"role\", \"content\"} objects",
                          "messages")
    prefix = "messages" if where == "messages" else f"{where}: messages"
    out = [check_message(m, f"{prefix}[{i}]", parts=parts) for i, m in enumerate(messages)]
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RecordError(where, "the conversation has no assistant turn to learn from", "messages")
    return out


def check_text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(where, f"\"{field}\" must be a string (got {type(value).__name__})", field)
    return value


def prompt_of(row: dict, where: str) -> str | list[dict]:
    """A prompt record for generation: {"prompt": "..."} or {"messages": [...]}."""
    if "messages" in row:
        return check_messages(row["messages"], where)
    if "prompt" in row:
        return check_text(row["prompt"], where, "prompt")
    raise RecordError(where, "expected a \"prompt\" (string) or \"messages\" (list) field")


def lines(path: Path) -> Iterator[tuple[str, str]]:
    """(FILE:LINE, text) of each line of a UTF-8 text file, read as it goes; a line that is not UTF-8 stops it
    with `FILE:LINE: not UTF-8`."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; bytes, so a bad line is found by its number
    except OSError as e:
        raise SlmError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                yield where, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(where, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_text(path: Path) -> str:
    """A whole UTF-8 text file; `FILE:LINE: not UTF-8` names the first bad line."""
    return "".join(text for _, text in lines(path))


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (FILE:LINE, record) for each non-empty line; a bad line raises with its place."""
    for where, line in lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(where, f"invalid JSON ({e.msg} at column {e.colno})") from e
        except RecursionError:
            raise RecordError(where, "invalid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise RecordError(where, f"expected a JSON object, got {type(row).__name__}")
        yield where, row


def read_stdin() -> str:
    """All of standard input as UTF-8 text."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(f"stdin:{line}", f"not UTF-8 (byte 0x{data[e.start]:02x})") from None


def read_prompts(prompt: str | None, input_file: Path | None) -> list[str | list[dict]]:
    """Prompts from the argument, a JSONL file ({"prompt": ...} or {"messages": [...]}) or stdin."""
    if input_file is not None:
        if not input_file.is_file():
            raise SlmError(f"input file not found: {input_file}")
        prompts = [prompt_of(row, where) for where, row in read_jsonl(input_file)]
        if not prompts:
            raise SlmError(f"{input_file} holds no prompts")
        return prompts
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise SlmError("give a prompt, --input FILE.jsonl, or pipe text on stdin")
        prompt = read_stdin()
    if not prompt.strip():
        raise SlmError("the prompt is empty")
    return [prompt]
