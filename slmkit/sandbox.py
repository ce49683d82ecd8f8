"""Running model-written Python safely: a pool of sandboxed workers.

Python-level guards are not a sandbox, so isolation comes from the operating system. Each worker is one
Python process started once inside **bubblewrap** (`bwrap`: its own network namespace with no interfaces,
the whole file system mounted read-only, a private tmpfs at /tmp, its own PID namespace, killed with its
parent). For every program the worker forks a child, which

- drops to the unprivileged user `nobody` when the worker runs as root (so it can write nowhere),
- may not start processes (RLIMIT_NPROC: `os.fork`, `os.system`, `subprocess` fail at once),
- has an address-space limit (a memory bomb raises MemoryError), a CPU-time limit and a file-size limit,
- writes its output to a capped file in a fresh temporary directory (its working directory),
- and is killed with its whole process group when the wall-clock limit passes.

The child execs the program, evaluates `call` (e.g. `solution()`) and reports the value; the worker
answers with a `Result`: status ok / error / timeout / memory / output. `run_binary` runs a compiled
program (e.g. SLaDe's decompiled C, built with gcc) the same way: the child writes the executable into its
temporary directory and `exec`s it under the same limits; the value is its exit status. Because the sandbox starts once
per worker and a program costs one fork, throughput is hundreds of programs per second
(`benchmarks/sandbox.py`).

Without bubblewrap (`apt-get install bubblewrap`) slmkit refuses to run untrusted code unless the caller
passes `unsandboxed=True` (CLI: `--unsafe-no-sandbox`): then the rlimits and the drop to `nobody` still
apply, but network and the file system are not isolated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from slmkit.errors import SlmError

NOBODY = 65534
# Imported by each worker before it forks: programs get them at no cost, and they work even where the
# unprivileged user cannot read the Python installation (e.g. one under /root).
PRELOAD = ("math", "cmath", "fractions", "decimal", "datetime", "itertools", "collections", "functools", "re",
           "statistics", "random", "string", "heapq", "bisect", "operator", "json", "typing", "dataclasses",
           "copy", "socket", "subprocess", "time", "calendar", "textwrap", "unicodedata", "numbers", "enum",
           "encodings.idna")


@dataclass
class Limits:
    timeout: float = 2.0  # wall-clock seconds per program
    memory_mb: int = 512  # address space of the program's process
    output_bytes: int = 65536  # stdout + stderr kept; more is an `output` failure
    file_bytes: int = 1 << 20  # largest file the program may write in its temporary directory


@dataclass
class Result:
    status: str  # ok | error | timeout | memory | output
    value: Any = None  # the value of `call` (JSON-compatible, else its repr) when status is ok
    stdout: str = ""
    error: str = ""  # the exception line (error), or what limit was hit
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def bwrap_command() -> list[str] | None:
    """The bubblewrap prefix, or None when bwrap is not installed."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    import site

    # the private /tmp hides the host's: code under /tmp (a checkout, a virtualenv) is mounted back, read-only
    needed = {_package_root(), sys.prefix, sys.base_prefix, *site.getsitepackages()}
    under_tmp = sorted(p for p in needed if os.path.realpath(p).startswith("/tmp/") and os.path.exists(p))
    binds = [arg for p in under_tmp for arg in ("--ro-bind", os.path.realpath(p), os.path.realpath(p))]
    return [bwrap, "--unshare-net", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--tmpfs", "/tmp", *binds, "--proc",
            "/proc", "--dev", "/dev", "--chdir", "/tmp"]


class Sandbox:
    """A pool of `workers` sandboxed Python processes. Use as a context manager, or call `close()`."""

    def __init__(self, workers: int = 2, limits: Limits | None = None, *, unsandboxed: bool = False):
        prefix = bwrap_command()
        if prefix is None and not unsandboxed:
            raise SlmError("bubblewrap (bwrap) is not installed, so model-written code cannot be isolated from "
                           "the network and file system: `apt-get install bubblewrap`, or pass "
                           "--unsafe-no-sandbox to run it with resource limits only")
        self.limits = limits or Limits()
        self.isolated = prefix is not None
        boot = f"import sys; sys.path.insert(0, {_package_root()!r}); import slmkit.sandbox as s; s.worker_main()"
        command = [*(prefix or []), sys.executable, "-I", "-c", boot]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self._workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
                         for _ in range(workers)]
        self._free = list(self._workers)
        self._lock = threading.Condition()
        for w in self._workers:  # each worker says "ready" once its sandbox is up
            line = w.stdout.readline()
            if line.strip() != "ready":
                self.close()
                raise SlmError("the sandbox worker did not start (is bubblewrap usable here? try "
                               "`bwrap --ro-bind / / true`)")

    def run(self, code: str, call: str | None = "solution()", stdin: str = "") -> Result:
        """Execute `code`, then evaluate `call` (None: just run the code) in the same namespace."""
        return self._request({"code": code, "call": call, "stdin": stdin})

    def _request(self, request: dict) -> Result:
        with self._lock:
            while not self._free:
                self._lock.wait()
            worker = self._free.pop()
        try:
            worker.stdin.write(json.dumps({**request, "limits": asdict(self.limits)}) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line:
                raise SlmError("a sandbox worker died; the pool must be restarted")
            return Result(**json.loads(line))
        finally:
            with self._lock:
                self._free.append(worker)
                self._lock.notify()

    def run_binary(self, binary: bytes, stdin: str = "") -> Result:
        """Execute a native executable (its bytes) under the same isolation and limits. `value` is the exit
        status; a non-zero status or a signal is an `error`."""
        import base64

        return self._request({"binary": base64.b64encode(binary).decode(), "stdin": stdin})

    def map(self, codes: list[str], call: str | None = "solution()") -> list[Result]:
        """Run many programs across the pool (results in order)."""
        with ThreadPoolExecutor(len(self._workers)) as pool:
            return list(pool.map(lambda c: self.run(c, call), codes))

    def close(self) -> None:
        for w in self._workers:
            if w.poll() is None:
                w.stdin.close()
                try:
                    w.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- inside the sandbox ----------------------------------------------------------------------------------


def _child(request: dict, workdir: str, report: int) -> None:
    """In the forked child: limit, drop privileges, run the program, write a JSON report to `report`."""
    import resource

    limits = request["limits"]
    os.setsid()  # its own process group, so the worker can kill everything it left behind
    os.chdir(workdir)
    out_path = os.path.join(workdir, ".out")
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    program = None
    if "binary" in request:
        import base64

        program = os.path.join(workdir, "program")
        with open(program, "wb") as f:
            f.write(base64.b64decode(request["binary"]))
        os.chmod(program, 0o700)
    if os.getuid() == 0:
        os.chown(workdir, NOBODY, NOBODY)
        os.chown(out_path, NOBODY, NOBODY)
        if program:
            os.chown(program, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    memory = limits["memory_mb"] << 20
    cpu = int(limits["timeout"]) + 1
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing
    os.dup2(out, 1)
    os.dup2(out, 2)
    if program:  # the executable inherits the limits and the report pipe; the worker sees EOF when it exits
        stdin_path = os.path.join(workdir, ".in")
        with open(stdin_path, "w") as f:
            f.write(request["stdin"])
        os.dup2(os.open(stdin_path, os.O_RDONLY), 0)
        os.set_inheritable(report, True)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        os.execv(program, [program])
    sys.stdout = sys.stderr = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
    import io

    sys.stdin = io.StringIO(request["stdin"])
    status, value, error = "ok", None, ""
    try:
        namespace: dict = {"__name__": "__main__"}
        exec(compile(request["code"], "<program>", "exec"), namespace)
        if request["call"]:
            value = eval(request["call"], namespace)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
    except MemoryError:
        status, error = "memory", f"memory limit of {limits['memory_mb']} MB exceeded"
    except OSError as e:
        import errno

        if e.errno == errno.EFBIG:
            status, error = "output", "output or file size limit exceeded"
        else:
            status, error = "error", f"{type(e).__name__}: {e}"
    except BaseException as e:  # noqa: BLE001 - the program's own exception is its result
        status, error = "error", f"{type(e).__name__}: {e}"[:1000]
    try:
        sys.stdout.flush()
    except OSError:
        status, error = "output", "output or file size limit exceeded"
    os.write(report, json.dumps({"status": status, "value": value, "error": error}).encode())
    os._exit(0)


def _serve_one(request: dict) -> dict:
    import select
    import signal
    import tempfile
    import time

    limits = request["limits"]
    workdir = tempfile.mkdtemp(prefix="run-")
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            _child(request, workdir, write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    chunks, deadline, timed_out = [], start + limits["timeout"], False
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_end], [], [], remaining)
        if not ready:
            continue
        data = os.read(read_end, 1 << 20)
        if not data:
            break
        chunks.append(data)
    for target in (-pid, pid):  # the child's group (it called setsid), then the child itself
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _, wait_status = os.waitpid(pid, 0)
    os.close(read_end)
    seconds = time.perf_counter() - start
    stdout = b""
    try:
        with open(os.path.join(workdir, ".out"), "rb") as f:
            stdout = f.read(limits["output_bytes"] + 1)
    except OSError:
        pass
    shutil.rmtree(workdir, ignore_errors=True)
    text = stdout[:limits["output_bytes"]].decode("utf-8", "replace")
    if timed_out:
        return {"status": "timeout", "stdout": text, "error": f"wall-clock limit of {limits['timeout']} s",
                "seconds": seconds}
    if "binary" in request:
        code = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None
        if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGXFSZ or \
                len(stdout) > limits["output_bytes"]:
            return {"status": "output", "stdout": text, "error": "output or file size limit exceeded",
                    "seconds": seconds}
        if code is None:
            error = f"killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
        else:
            error = "" if code == 0 else f"exit status {code}"
        return {"status": "error" if error else "ok", "value": code, "stdout": text, "error": error,
                "seconds": seconds}
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        sig = os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None
        why = {signal.SIGXCPU: "CPU-time limit exceeded", signal.SIGKILL: "killed"}.get(sig, f"signal {sig}")
        return {"status": "error", "stdout": text,
                "error": f"the program ended without a result ({why if sig else 'exit'})", "seconds": seconds}
    if report["status"] == "ok" and len(stdout) > limits["output_bytes"]:
        report.update(status="output", value=None, error=f"more than {limits['output_bytes']} bytes of output")
    return {**report, "stdout": text, "seconds": seconds}


def worker_main() -> None:
    """The worker loop: one JSON request per stdin line, one JSON result per stdout line."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(_serve_one(json.loads(line))), flush=True)


if __name__ == "__main__":
    worker_main()
