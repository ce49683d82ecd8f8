"""Figures in the docs are written from their sources: the measured tables between markers in docs/*.md are
what benchmarks/tables.py makes from benchmarks/results/*.json and the defaults in the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_tables_match_their_sources():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_docs_links_point_at_files():
    import re

    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, _ in re.findall(r"\]\(([^)#:\s]+)(#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not there"


def _shown_commands():
    """(doc, `slm ...` command line) for every command in a code block or inline code of the README and docs."""
    import re

    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(slm [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            line = re.sub(r"\$\(.*\)", "", line.split(" # ")[0])  # comments and shell substitutions
            for part in re.split(r"&&|\|\||;|\|", line):
                words = part.split()
                if words[:1] == ["slm"]:
                    yield doc.name, words[1:]


def test_docs_show_only_commands_and_flags_that_exist():
    """Every `slm ...` the README and docs show names a command that exists, with flags it takes."""
    import typer

    from slmkit.cli import app

    root = typer.main.get_command(app)
    wrong = []
    for doc, words in _shown_commands():
        command, shown = root, ["slm"]
        while hasattr(command, "commands") and words and not words[0].startswith("-"):
            if words[0] in ("COMMAND",):  # a placeholder: `slm COMMAND --help`
                command = None
                break
            sub = command.get_command(None, words[0])
            if sub is None:
                wrong.append(f"{doc}: `{' '.join(shown + words[:1])}` is not a command")
                command = None
                break
            command, shown, words = sub, shown + words[:1], words[1:]
        if command is None:
            continue
        if hasattr(command, "commands") and not words:
            continue  # a group named on its own (`slm gsm` ...)
        flags = {name for param in command.params for name in param.opts + param.secondary_opts}
        for word in words:
            flag = word.split("=")[0]
            if flag.startswith("-") and not flag[1:].isdigit() and flag not in flags and flag != "--help":
                wrong.append(f"{doc}: `{' '.join(shown)}` has no option {flag}")
    assert not wrong, "\n".join(sorted(set(wrong)))
