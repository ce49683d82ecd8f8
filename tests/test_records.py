"""The one record validator: the server and every file reader reject the same bad records with the same words,
naming the file and line (or the request field); bad bytes are `FILE:LINE: not UTF-8`; never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from slmkit.data.records import RecordError, check_messages, prompt_of, read_jsonl, read_text

BAD_BYTES = b'{"prompt": "caf\xe9"}\n'  # Latin-1, not UTF-8


def slm(*args, stdin: bytes | None = None):
    """The `slm` command with a wide terminal, so an error line is not wrapped."""
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", *args], input=stdin, capture_output=True, timeout=300,
                       env={**os.environ, "COLUMNS": "500"})
    return r.returncode, r.stderr.decode()


def test_messages_are_checked_field_by_field():
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]
    good = check_messages([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
                          "messages")
    assert good == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    cases = [
        ([{"role": "wizard", "content": "hi"}], "messages[0]: \"role\" must be one of", "messages[0].role"),
        ([{"content": "hi"}], "(no role)", "messages[0].role"),
        ([{"role": "user", "content": 5}], "\"content\" must be a string", "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "a text part needs a string",
         "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "a content part must be", "messages[0].content[0]"),
        (["hi"], "a message must be an object", "messages[0]"),
        ([], "must be a non-empty list", "messages"),
        ("hi", "must be a non-empty list", "messages"),
    ]
    for messages, words, field in cases:
        with pytest.raises(RecordError, match=__import__("re").escape(words)) as e:
            check_messages(messages, "messages")
        assert e.value.field == field
    with pytest.raises(RecordError, match="no assistant turn"):
        check_messages([{"role": "user", "content": "hi"}], "f.jsonl:3", need_assistant=True)
    with pytest.raises(RecordError, match=r"f.jsonl:2: \"prompt\" must be a string \(got list\)"):
        prompt_of({"prompt": ["a"]}, "f.jsonl:2")


def test_files_name_the_line_that_is_not_utf8_or_not_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n\n' + BAD_BYTES)
    with pytest.raises(RecordError, match=f"^{path}:3: not UTF-8 \\(byte 0xe9 at column 16\\)$"):
        list(read_jsonl(path))
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(RecordError, match=f"^{path}:2: invalid JSON"):
        list(read_jsonl(path))
    path.write_bytes(b"[" * 100_000 + b"\n")
    with pytest.raises(RecordError, match=f"^{path}:1: invalid JSON"):
        list(read_jsonl(path))
    text = tmp_path / "doc.txt"
    text.write_bytes(b"line one\nline two\n" + b"\xff\xfe\n")
    with pytest.raises(RecordError, match=f"^{text}:3: not UTF-8"):
        read_text(text)


def test_commands_report_bad_records_in_one_line(tmp_path):
    """generate, finetune, pretrain and run on bad files: exit 1 with the file and line, no traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_BYTES)
    wizard = tmp_path / "wizard.jsonl"
    wizard.write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    checks = [
        (("generate", "--input", str(bad)), f"{bad}:1: not UTF-8"),
        (("generate", "--input", str(wizard)), f"{wizard}:1: messages[0]: \"role\" must be one of"),
        (("finetune", "--data", str(bad), "--steps", "1", "--runs-dir", str(tmp_path / "runs")),
         f"{bad}:1: not UTF-8"),
        (("finetune", "--data", str(wizard), "--steps", "1", "--runs-dir", str(tmp_path / "runs")),
         f"{wizard}:1: messages[0]: \"role\" must be one of"),
        (("pretrain", "--data", str(bad), "--steps", "1", "--runs-dir", str(tmp_path / "runs")),
         f"{bad}:1: not UTF-8"),
        (("run", str(binary)), f"{binary}:2: not UTF-8 (byte 0x80 at column 118)"),  # bytes 0-9, a newline, 11-127
    ]
    for args, message in checks:
        code, stderr = slm(*args)
        assert code == 1 and message in stderr and "Traceback" not in stderr, (args, stderr)
    code, stderr = slm("generate", "-", stdin=b"caf\xe9\n")
    assert code == 1 and "stdin:1: not UTF-8" in stderr and "Traceback" not in stderr
