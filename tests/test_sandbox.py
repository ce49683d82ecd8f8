"""The sandbox for model-written code: results, and survival of the attacks a generated program can make
(infinite loops, memory bombs, fork bombs, os.system, subprocesses, file deletion and writes, network,
huge outputs). Isolation checks need bubblewrap (the README's test command installs it); the resource
limits are checked with and without it."""

import http.server
import threading
from pathlib import Path

import pytest

from slmkit.errors import SlmError
from slmkit.sandbox import Limits, Sandbox, bwrap_command

HAVE_BWRAP = bwrap_command() is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed (apt-get install bubblewrap)")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(2, Limits(timeout=1.0, memory_mb=256, output_bytes=4096), unsandboxed=not HAVE_BWRAP) as sb:
        yield sb


def test_runs_a_solution_and_reports_value_output_and_errors(sandbox):
    r = sandbox.run("def solution():\n    print('working')\n    total = 3 * 14\n    return total")
    assert r.ok and r.value == 42 and r.stdout == "working\n"
    assert sandbox.run("def solution():\n    return 1 / 0").error == "ZeroDivisionError: division by zero"
    assert sandbox.run("def solution(:\n    pass").error.startswith("SyntaxError")
    assert sandbox.run("x = 5", call=None).ok
    assert sandbox.run("import math\ndef solution():\n    return {1, 2}").value == "{1, 2}"  # repr when not JSON
    scratch = "def solution():\n    open('notes.txt', 'w').write('ok')\n    return open('notes.txt').read()"
    assert sandbox.run(scratch).value == "ok"  # its own temporary directory is writable


@pytest.mark.parametrize("code, status, error", [
    ("def solution():\n    while True:\n        pass", "timeout", "wall-clock limit"),
    ("def solution():\n    x = [0] * 10**9\n    return len(x)", "memory", "memory limit of 256 MB"),
    ("import os\ndef solution():\n    while True:\n        os.fork()", "error", "BlockingIOError"),
    ("import subprocess\ndef solution():\n    return subprocess.run(['ls'])", "error", "BlockingIOError"),
    ("def solution():\n    while True:\n        print('x' * 1000)", "output", "output or file size limit"),
    ("def solution():\n    print('y' * 100000)\n    return 1", "output", "more than 4096 bytes"),
    ("def solution():\n    open('big', 'wb').write(b'0' * (8 << 20))", "output", "output or file size limit"),
])
def test_attacks_fail_cleanly_and_the_pool_survives(sandbox, code, status, error):
    r = sandbox.run(code)
    assert r.status == status and error in r.error, r
    assert len(r.stdout) <= 4096
    assert r.seconds < 3
    assert sandbox.run("def solution():\n    return 7").value == 7  # the worker is still healthy


def test_os_system_runs_nothing(sandbox, tmp_path):
    r = sandbox.run(f"import os\ndef solution():\n    return os.system('echo owned > {tmp_path}/flag')")
    assert r.value != 0 and not (tmp_path / "flag").exists() and r.stdout == ""


@needs_bwrap
def test_no_file_deletion_or_writes_outside_its_directory(sandbox):
    here = Path(__file__).resolve().parent  # outside /tmp, visible inside the sandbox (read-only)
    victim, new = here / ".sandbox-victim.txt", here / ".sandbox-new.txt"
    victim.write_text("precious")
    try:
        r = sandbox.run(f"import os\ndef solution():\n    os.remove({str(victim)!r})")
        assert r.status == "error" and ("Read-only" in r.error or "Permission" in r.error), r
        assert victim.read_text() == "precious"
        r = sandbox.run(f"def solution():\n    open({str(new)!r}, 'w').write('x')")
        assert r.status == "error" and not new.exists()
        r = sandbox.run("def solution():\n    open('/etc/passwd', 'a').write('x')")
        assert r.status == "error"
    finally:
        victim.unlink(missing_ok=True)
        new.unlink(missing_ok=True)


@needs_bwrap
def test_no_network_not_even_this_machines_loopback(sandbox):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        code = f"import socket\ndef solution():\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)"
        r = sandbox.run(code)
        assert r.status == "error" and "Connection refused" in r.error  # its own empty loopback, not ours
        r = sandbox.run("import socket\ndef solution():\n    socket.create_connection(('1.1.1.1', 443), timeout=1)")
        assert r.status == "error" and "unreachable" in r.error
    finally:
        server.shutdown()


def test_many_programs_in_parallel(sandbox):
    codes = [f"def solution():\n    return sum(range({n}))" for n in range(200)]
    assert [r.value for r in sandbox.map(codes)] == [sum(range(n)) for n in range(200)]


def test_refuses_without_bubblewrap_unless_told(monkeypatch):
    import slmkit.sandbox as sb

    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    with pytest.raises(SlmError, match="bubblewrap .* is not installed.*--unsafe-no-sandbox"):
        Sandbox(1)
    with Sandbox(1, Limits(timeout=1.0), unsandboxed=True) as unsafe:  # resource limits still hold
        assert not unsafe.isolated
        assert unsafe.run("def solution():\n    return 2 + 2").value == 4
        assert unsafe.run("import os\ndef solution():\n    os.fork()").status == "error"


NATIVE = {  # C programs a decompiled function could turn into, and what the sandbox must report
    "echo": ('int main(void){ int x; scanf("%d", &x); printf("%d\\n", 2 * x); return 0; }', "ok", ""),
    "exit": ("int main(void){ return 3; }", "error", "exit status 3"),
    "loop": ("int main(void){ volatile int x = 0; for (;;) x++; }", "timeout", "wall-clock limit"),
    "segv": ("int main(void){ return *(volatile int *)0; }", "error", "killed by SIGSEGV"),
    "flood": ('int main(void){ for (;;) puts("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"); }', "output", "output"),
    # the address-space limit makes malloc fail; touching one byte per chunk keeps the run far below the
    # wall-clock limit on a loaded machine (filling every page took over 1 s there)
    "memory": ("int main(void){ for (;;) { char *p = malloc(1 << 24); if (!p) return 9; p[0] = 1; } }",
               "error", "exit status 9"),
    "escape": ('int main(void){ printf("%d %d", fork(), system("touch /tmp/.owned")); '
               'FILE *f = fopen("' + str(Path(__file__).resolve().parent / ".native-owned") + '", "w"); '
               'printf(" %d\\n", f == 0); return 0; }', "ok", ""),
}


@pytest.mark.skipif(__import__("shutil").which("gcc") is None, reason="gcc is not installed")
def test_native_programs_fail_cleanly(sandbox, tmp_path):
    import subprocess

    for name, (body, status, error) in NATIVE.items():
        source = tmp_path / f"{name}.c"
        source.write_text("#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include <unistd.h>\n"
                          + body + "\n")
        subprocess.run(["gcc", "-O0", "-w", str(source), "-o", str(tmp_path / name)], check=True)
        r = sandbox.run_binary((tmp_path / name).read_bytes(), stdin="21")
        assert r.status == status and error in r.error, (name, r)
        assert len(r.stdout) <= 4096 and r.seconds < 3
        if name == "echo":
            assert r.stdout == "42\n" and r.value == 0
        if name == "escape":  # no process could start, nothing was written
            forked, system, no_file = r.stdout.split()
            assert forked == "-1" and system != "0" and no_file == "1"
            assert not (Path(__file__).resolve().parent / ".native-owned").exists()
    assert sandbox.run("def solution():\n    return 7").value == 7  # the pool still serves Python
