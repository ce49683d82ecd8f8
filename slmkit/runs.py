"""Run directories: what state a run is in, and what it left (read by `slm dashboard` and the `/runs` page).

A workflow writes `RUNS_DIR/NAME/`; its training stages (one, or several in sub-directories: PET's members,
Orca's two students) each hold `metrics.jsonl` and `checkpoints/` (see train.py). Two files say what is going on:

    RUNS_DIR/NAME/workflow.jsonl   appended by the CLI and recipes: one line when a workflow starts in the
                                   directory, one when it ends (finished, failed with its error, interrupted)
    <stage>/status.json            written by the training loop: state, step, total, start time, pid and host

A state left at "running" by a process that is gone (killed with -9, a machine restart) reads as "interrupted".
Nothing here writes to a run except those two records; the readers never follow a path out of RUNS_DIR.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from slmkit.errors import SlmError

STATES = ("running", "finished", "failed", "interrupted")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")  # one path segment of a run or stage name
RESULT_LIMIT = 4 << 20  # a result JSON or plot larger than this is listed but not served
METRICS_CHUNK = 1 << 20  # metrics lines served per request: a long run's curve comes in pieces


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _alive(record: dict) -> bool:
    """Whether the process that wrote a "running" record still runs (only knowable on its own host)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class StageStatus:
    """status.json of one training stage, kept current by the training loop."""

    def __init__(self, run_dir: Path, *, total: int, start: int):
        self.path = Path(run_dir) / "status.json"
        now = time.time()
        self.record = {"state": "running", "step": start, "total": total, "start_step": start, "started": now,
                       "updated": now, "pid": os.getpid(), "host": socket.gethostname()}
        self.write()

    def write(self, **changes) -> None:
        self.record.update(changes, updated=time.time())
        _write(self.path, json.dumps(self.record) + "\n")

    def end(self, error: BaseException | None) -> None:
        """Record how the stage ended: finished, interrupted (Ctrl-C, SIGTERM) or failed with its error."""
        if error is None:
            self.write(state="finished")
        elif isinstance(error, (KeyboardInterrupt, SystemExit)):
            self.write(state="interrupted")
        else:
            self.write(state="failed", error=f"{type(error).__name__}: {error}"[:2000])


def source_version() -> dict:
    """The git commit of the slmkit source that is running, and whether it had uncommitted changes (an installed
    package that is not a checkout has none)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return {"commit": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "slmkit"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def record_workflow(run_dir: Path, event: dict) -> None:
    """Append one line to RUN/workflow.jsonl (the directory is made if the workflow has not made it yet)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "workflow.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "host": socket.gethostname(), **event},
                           default=str) + "\n")


# --- reading ---------------------------------------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written, or damaged: the rest still reads
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _last_step(path: Path) -> int:
    """The step of the last complete line of a metrics file, reading only its end (a long run's file is large)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read()
    except OSError:
        return 0
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            continue
    return 0


def stage_state(record: dict) -> str:
    state = record.get("state")
    if state == "running" and not _alive(record):
        return "interrupted"
    return state if state in STATES else "unknown"


def stages(run_dir: Path) -> list[Path]:
    """The training stages of a run: directories (the run's own, or up to three levels down) with metrics."""
    found = [run_dir] if (run_dir / "metrics.jsonl").is_file() or (run_dir / "status.json").is_file() else []
    for depth in ("*", "*/*", "*/*/*"):
        found += sorted(p.parent for p in run_dir.glob(f"{depth}/metrics.jsonl") if _visible(p.parent, run_dir))
    return found


def _visible(path: Path, root: Path) -> bool:
    return all(NAME.fullmatch(part) for part in path.relative_to(root).parts)


def last_workflow(run_dir: Path) -> dict:
    """The last workflow started in the run directory, with its state."""
    events = _lines(run_dir / "workflow.jsonl")
    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    if not starts:
        return {}
    start = events[starts[-1]]
    ended = [e for e in events[starts[-1] + 1:] if e.get("event") == "end"]
    state = ended[0].get("state", "unknown") if ended else ("running" if _alive(start) else "interrupted")
    out = {"command": start.get("command"), "argv": start.get("argv"), "started": start.get("time"),
           "source": start.get("source"),
           "resume_args": start.get("resume_args"), "state": state}
    if ended:
        out.update(ended=ended[0].get("time"), error=ended[0].get("error"))
    return out


def _eta(record: dict) -> float | None:
    done = record.get("step", 0) - record.get("start_step", 0)
    if record.get("state") != "running" or done <= 0:
        return None
    elapsed = record.get("updated", 0) - record.get("started", 0)
    return max(0.0, elapsed / done * (record.get("total", 0) - record.get("step", 0)))


def summary(run_dir: Path) -> dict:
    """One run as the dashboard's list shows it: workflow, state, the current stage's step / total, ETA."""
    return _summary(Path(run_dir), last_workflow(Path(run_dir)), stage_records(Path(run_dir)))


def stage_records(run_dir: Path) -> list[dict]:
    """Each training stage's status (state, step, total, updated...) with its path ("stage") in the run."""
    records = []
    for stage in stages(run_dir):
        record = _json(stage / "status.json")
        if not record:  # a run from before status files: its last metrics line says how far it got
            total = _json(stage / "config.json").get("train", {}).get("steps")
            record = {"state": "finished" if (stage / "model").is_dir() else "unknown",
                      "step": _last_step(stage / "metrics.jsonl"), "total": total,
                      "updated": (stage / "metrics.jsonl").stat().st_mtime}
        records.append({**record, "state": stage_state(record), "stage": _rel(stage, run_dir)})
    return records


def _summary(run_dir: Path, workflow: dict, records: list[dict]) -> dict:
    current = max(records, key=lambda r: (r["state"] == "running", r.get("updated", 0)), default={})
    state = workflow.get("state") or current.get("state") or "unknown"
    if state == "running" and workflow and not records:
        current = {}
    config = _json(run_dir / "config.json")
    return {"name": run_dir.name, "workflow": workflow.get("command") or config.get("workflow"), "state": state,
            "stage": current.get("stage"), "step": current.get("step"), "total": current.get("total"),
            "eta": _eta(current) if state == "running" else None, "stages": len(records),
            "updated": max([r.get("updated", 0) for r in records] + [workflow.get("ended") or 0,
                                                                      workflow.get("started") or 0]),
            "error": workflow.get("error") or next((r.get("error") for r in records if r.get("error")), None)}


def _rel(path: Path, root: Path) -> str:
    return "/".join(path.relative_to(root).parts) or "."


def list_runs(runs_dir: Path) -> list[dict]:
    """Every run under RUNS_DIR, most recently active first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [summary(p) for p in runs_dir.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(runs, key=lambda r: r["updated"], reverse=True)


def run_path(runs_dir: Path, name: str, rel: str = ".") -> Path:
    """RUNS_DIR/NAME/REL, refused unless every segment is a plain name and the result stays inside the run."""
    parts = [] if rel in (".", "") else rel.split("/")
    missing = SlmError(f"no run {name}" + (f" with {rel}" if parts else ""))
    if not all(NAME.fullmatch(p) for p in [name, *parts]):
        raise missing
    root = (Path(runs_dir) / name).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root) or not path.exists():
        raise missing
    return path


def detail(runs_dir: Path, name: str) -> dict:
    """A run's page: its summary, the last workflow's command line and how to resume it, each stage's config
    and status, and the result files (JSON) and plots (PNG) it wrote."""
    run_dir = run_path(runs_dir, name)
    workflow, records = last_workflow(run_dir), stage_records(run_dir)
    out = {**_summary(run_dir, workflow, records), "name": name, "command": workflow.get("argv"),
           "resume": resume_hint(workflow)}  # the name asked for: a run directory may be a symlink to another name
    out["stages"] = [{"path": r["stage"], "config": _json(run_dir / r["stage"] / "config.json"), "state": r["state"],
                      "step": r.get("step"), "total": r.get("total")} for r in records]
    files = [p for pattern in ("*.json", "*/*.json", "*/*/*.json", "*.png", "*/*.png", "*/*/*.png")
             for p in run_dir.glob(pattern) if _result_file(p, run_dir)]
    out["files"] = [{"path": _rel(p, run_dir), "kind": p.suffix[1:], "bytes": p.stat().st_size}
                    for p in sorted(set(files))]
    return out


def _result_file(path: Path, run_dir: Path) -> bool:
    """A JSON or plot a workflow wrote: not a run's own records, nor a file of a model directory or checkpoint."""
    model_dir = any(path.parent.glob("*.safetensors")) or (path.parent / "tokenizer_config.json").is_file()
    return (_visible(path, run_dir) and path.name not in ("config.json", "status.json") and not model_dir
            and "checkpoints" not in path.relative_to(run_dir).parts)


def resume_hint(workflow: dict) -> str | None:
    """The command that continues the last workflow: its command line, with --resume (a recipe: --set
    resume=true) where the workflow resumes, else the command line that reruns it."""
    argv, extra = workflow.get("argv"), workflow.get("resume_args") or []
    if not argv or workflow.get("state") in ("finished", "running"):
        return None
    import shlex

    return "slm " + shlex.join(argv + ([] if set(extra) <= set(argv) else extra))


def read_metrics(path: Path, offset: int = 0) -> dict:
    """The complete lines of a metrics.jsonl from byte `offset` (at most METRICS_CHUNK bytes of them): the rows,
    the offset to ask from next, and `reset` when the file was cut shorter (a resumed run drops lines past its
    checkpoint), in which case the rows start again from the top."""
    size = path.stat().st_size
    reset = offset > size
    start = 0 if reset else max(0, offset)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(METRICS_CHUNK)
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next request
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return {"rows": rows, "offset": start + end, "reset": reset, "more": start + end < size}
