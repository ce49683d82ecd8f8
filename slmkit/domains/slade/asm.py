"""SLaDe's assembly: gcc -S at each level and architecture, the target function cut out and normalised,
divisions by a constant marked with their divisor.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from slmkit.domains.slade.cgen import ARCHES, ASM_FLAGS, HEADERS, Program
from slmkit.errors import SlmError


def _gcc(gcc: str, args: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run gcc (C locale, so diagnostics quote with ASCII '...'); a timeout is a failed run."""
    env = {**os.environ, "LC_ALL": "C"}
    try:
        return subprocess.run([gcc, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 1, "", "error: gcc timed out")


def compile_asm(source: str, level: str, arch: str = "x86_64") -> str:
    """gcc -S at LEVEL (O0, O3, ...) for ARCH (x86_64, or aarch64 with Debian's cross compiler) of a C
    compilation unit; the assembly text."""
    if arch not in ARCHES:
        raise SlmError(f"unknown architecture '{arch}' (one of {', '.join(ARCHES)})")
    gcc, _, package = ARCHES[arch]
    if shutil.which(gcc) is None:
        raise SlmError(f"{gcc} is not installed: `apt-get install {package}`")
    with tempfile.TemporaryDirectory(prefix="slade-") as tmp:
        (Path(tmp) / "f.c").write_text(source)
        done = _gcc(gcc, [f"-{level}", *ASM_FLAGS, "f.c", "-o", "f.s"], tmp)
        if done.returncode:
            raise SlmError(f"{gcc} -{level} failed: {_first_error(done.stderr)}")
        return (Path(tmp) / "f.s").read_text()


def normalise_asm(asm: str, function: str, arch: str = "x86_64") -> str:
    """The instructions of FUNCTION in gcc's assembly: directives and comments dropped, one space between
    mnemonic and operands, local labels that are jumped to or read renumbered in order of appearance (others
    dropped), and the local constants it references (`.LC0: .long ...`) appended."""
    comment = ARCHES[arch][1]
    lines = [ln.split(comment, 1)[0].rstrip() for ln in asm.splitlines()]
    try:
        start = lines.index(f"{function}:")
    except ValueError:
        raise SlmError(f"function '{function}' not found in the assembly") from None
    body = []
    for ln in lines[start + 1:]:
        s = ln.strip()
        if s.startswith(".size") or (s.endswith(":") and not s.startswith(".L")):  # the next function
            break
        if s and (not s.startswith(".") or re.fullmatch(r"\.L\w+:", s)):
            body.append(re.sub(r"\s+", " ", s.replace("\t", " ")))
    used = set(re.findall(r"\.L\w+", "\n".join(b for b in body if not b.endswith(":"))))
    body = [b for b in body if not b.endswith(":") or b[:-1] in used]
    constants = []  # .LCn blocks the function reads
    for label in dict.fromkeys(re.findall(r"\.LC\d+", "\n".join(body))):
        if f"{label}:" in lines:
            i = lines.index(f"{label}:") + 1
            block = [label + ":"]
            while i < len(lines) and re.match(r"\s+\.(long|quad|value|byte|word|hword|xword|string|ascii|float|"
                                               r"double)\b", lines[i]):
                block.append(re.sub(r"\s+", " ", lines[i].strip()))
                i += 1
            constants += block
    text = "\n".join([f"{function}:", *body, *constants])
    labels = dict.fromkeys(re.findall(r"\.L\w+", text))
    text = re.sub(r"\.L\w+", lambda m: f".L{list(labels).index(m.group())}", text)
    return "\n".join(_mark_division(line, comment) for line in text.split("\n")) + "\n"


def divisor_of(value: int) -> int | None:
    """D when VALUE is the reciprocal gcc multiplies by to divide by a constant: 2^e/D rounded up, stored as
    is, as a signed immediate, or less 2^bits (the 33-bit magic numbers of unsigned division), for 32- or
    64-bit division (not 16-bit: its magic numbers are too short to tell from other constants); otherwise
    None. The number fixes D only up to a power of two (2^33/6 rounds up to 2^32/3's 1431655766; the shifts
    that follow tell them apart), so D is the odd divisor, 3..4095. (On aarch64 the number is built in 16-bit
    halves, `mov` + `movk`, and is not marked.)"""
    for bits in (32, 64):
        if not -(1 << (bits - 1)) <= value < (1 << bits):
            continue
        unsigned = value % (1 << bits)
        if unsigned < 1 << (bits - 12):
            continue
        for magic in (unsigned, unsigned + (1 << bits)):
            for exponent in range(bits - 12, bits + 12):
                power = 1 << exponent
                d = (power + magic // 2) // magic
                if 0 <= magic * d - power < 2 * d and d % 2:  # 2^e/d rounded up (by less than 2)
                    return d if 3 <= d < 4096 else None
    return None


def _mark_division(line: str, comment: str) -> str:
    """LINE with `COMMENT div D` appended when one of its constants is gcc's magic number for dividing by D."""
    for number in re.findall(r"(?<![\w.])-?\d{6,}", line):
        d = divisor_of(int(number))
        if d:
            return f"{line} {comment} div {d}"
    return line


def asm_of(program: Program, level: str, arch: str = "x86_64") -> str:
    return normalise_asm(compile_asm(HEADERS + program.source, level, arch), program.name, arch)


def target_of(row: dict) -> str:
    """The evaluation group of a corpus row: architecture and optimisation level, e.g. `x86_64 -O3`."""
    return f"{row.get('arch', 'x86_64')} -{row['level']}"


def _first_error(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if "error" in ln]
    return (errors or stderr.splitlines() or ["unknown error"])[0].strip()[:300]
