"""The web pages `slm serve` and `slm dashboard` serve: static files from `slmkit/web/` (no build step) and the
read-only JSON the runs dashboard and the proofs page read.

    /                    the chat playground (on `slm dashboard`, which has no model: the runs dashboard)
    /runs                the runs dashboard: every run, its state and ETA, live loss curves, results, comparison
    /proofs              the miniature proofs: each system's commands, its claims measured here, the committed ones
    /web/FILE            the pages' scripts, styles and vendored libraries
    /api/runs            every run under the runs directory (runs.list_runs)
    /api/runs/NAME       one run (runs.detail)
    /api/runs/NAME/metrics?stage=PATH&offset=BYTES   a stage's metrics.jsonl lines from a byte offset
    /api/runs/NAME/files/PATH                        a result JSON or plot the run wrote
    /api/proofs          every proof's status (proofs.proof_status)

Page files load without the API key (they hold no data); the `/api/` routes need it when the server has one.
Nothing outside `slmkit/web` and the runs directory is ever read, and nothing is written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from slmkit import runs
from slmkit.errors import ApiError, SlmError

WEB = Path(__file__).parent / "web"
PAGES = {"/": "index.html", "/runs": "runs.html", "/proofs": "proofs.html"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".json": "application/json", ".png": "image/png"}
HEADERS = {  # model output is rendered as text or markdown; even so, the pages may run only their own scripts
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: "
                               "blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def is_page(path: str) -> bool:
    """A page or one of its files: served without the API key."""
    path = urlsplit(path).path
    return path.rstrip("/") in PAGES or path == "/" or path.startswith("/web/")


def web_file(url_path: str) -> Path:
    """The packaged web file a /web/... path names; anything else (other directories, other kinds) is a 404."""
    name = urlsplit(url_path).path.removeprefix("/web/")
    path = (WEB / name).resolve()
    if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)?\.[a-z]+", name) or ".." in name or \
            not path.is_relative_to(WEB.resolve()) or path.suffix not in (".html", ".js", ".css") or \
            not path.is_file():
        raise ApiError(404, f"unknown path {url_path[:100]}")
    return path


def respond(url: str, runs_dir: Path, *, model: bool = True) -> tuple[bytes, str] | None:
    """(body, content type) for a page, web file or `/api/` route; None when the path is none of them (the model
    server's own routes). Errors are ApiErrors (404 for anything not there, 400 for a bad query)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/") or "/"
    if path in PAGES:
        return _file(WEB / (PAGES[path] if model or path != "/" else PAGES["/runs"]))
    if parts.path.startswith("/web/"):
        return _file(web_file(url))
    if path == "/api/proofs":
        from slmkit.proofs import proof_status

        return _json(proof_status(runs_dir))
    if path != "/api/runs" and not path.startswith("/api/runs/"):
        return None
    segments = [unquote(s) for s in path.split("/")[3:]]
    query = parse_qs(parts.query)
    try:
        if not segments:
            return _json({"runs_dir": str(runs_dir), "runs": runs.list_runs(runs_dir)})
        name, rest = segments[0], segments[1:]
        if not rest:
            return _json(runs.detail(runs_dir, name))
        if rest == ["metrics"]:
            stage = runs.run_path(runs_dir, name, query.get("stage", ["."])[0])
            if not (stage / "metrics.jsonl").is_file():
                raise SlmError(f"no metrics in run {name}")
            return _json(runs.read_metrics(stage / "metrics.jsonl", _offset(query)))
        if rest[0] == "files" and len(rest) > 1:
            return _result(runs.run_path(runs_dir, name, "/".join(rest[1:])), name)
    except ApiError:
        raise
    except SlmError as e:
        raise ApiError(404, str(e)) from e
    raise ApiError(404, f"unknown path {url[:100]}")


def _offset(query: dict) -> int:
    value = query.get("offset", ["0"])[0]
    if not value.isdigit() or len(value) > 15:
        raise ApiError(400, f"offset must be a byte count (got {value[:20]!r})", "offset")
    return int(value)


def _file(path: Path) -> tuple[bytes, str]:
    return path.read_bytes(), TYPES[path.suffix]


def _json(body) -> tuple[bytes, str]:
    return json.dumps(_finite(body), allow_nan=False, default=str).encode(), TYPES[".json"]


def _finite(value):
    """JSON a browser can parse: a diverged loss (NaN, inf) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _result(path: Path, run: str) -> tuple[bytes, str]:
    if path.suffix not in (".json", ".png") or not path.is_file() or path.name == "status.json":
        raise SlmError(f"no result file {path.name} in run {run}")
    if path.stat().st_size > runs.RESULT_LIMIT:
        raise SlmError(f"{path.name} in run {run} is larger than {runs.RESULT_LIMIT >> 20} MB; open it from disk")
    if path.suffix == ".png":
        return _file(path)
    try:
        return _json(json.loads(path.read_text()))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SlmError(f"{path.name} in run {run} is not valid JSON") from e
