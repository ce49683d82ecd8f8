"""Run records and the runs dashboard's HTTP surface: states, incremental metrics, and what a careless or hostile
client may ask for (paths out of the runs directory, bad offsets, huge files, no API key)."""

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from slmkit import runs
from slmkit.serve import Server
from slmkit.workflows import WORKFLOWS, run


def write_lines(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_metrics_are_read_incrementally_whole_lines_only_and_restart_when_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}], tail='{"step": 3, "lo')
    first = runs.read_metrics(path)
    assert [r["step"] for r in first["rows"]] == [1, 2] and not first["reset"]
    assert first["offset"] == len(path.read_bytes()) - len('{"step": 3, "lo')  # the half-written line waits
    with open(path, "a") as f:
        f.write('ss": 3.5}\n{"step": 4, "loss": NaN}\n')
    second = runs.read_metrics(path, first["offset"])
    assert [r["step"] for r in second["rows"]] == [3, 4] and second["offset"] == path.stat().st_size
    write_lines(path, [{"step": 1, "loss": 5.0}])  # a resume dropped the lines past its checkpoint
    third = runs.read_metrics(path, second["offset"])
    assert third["reset"] and [r["step"] for r in third["rows"]] == [1]


def test_states_from_the_records(tmp_path):
    (tmp_path / "a").mkdir()
    stage = runs.StageStatus(tmp_path / "a", total=100, start=20)
    stage.write(step=60)
    s = runs.summary(tmp_path / "a")
    assert (s["state"], s["step"], s["total"]) == ("running", 60, 100) and s["eta"] is not None
    stage.end(KeyboardInterrupt())
    assert runs.summary(tmp_path / "a")["state"] == "interrupted"
    stage.end(ValueError("loss is NaN"))
    s = runs.summary(tmp_path / "a")
    assert s["state"] == "failed" and s["error"] == "ValueError: loss is NaN"
    # a "running" record left by a process that is gone reads as interrupted
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "b").mkdir()
    record = {**stage.record, "state": "running", "pid": int(dead.stdout)}
    (tmp_path / "b" / "status.json").write_text(json.dumps(record))
    assert runs.summary(tmp_path / "b")["state"] == "interrupted"


def test_a_workflow_records_its_start_end_and_error(tmp_path):
    workflow = next(w for w in WORKFLOWS if w.command == "flan eval")
    with pytest.raises(Exception, match="no-such-cluster"):
        run(workflow, {"held_out": "no-such-cluster", "run": "bad", "runs_dir": tmp_path},
            argv=["flan", "eval", "--held-out", "no-such-cluster"], resume_args=["--resume"])
    events = [json.loads(line) for line in (tmp_path / "bad" / "workflow.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "end"] and events[0]["command"] == "flan eval"
    s = runs.detail(tmp_path, "bad")
    assert s["state"] == "failed" and "no-such-cluster" in s["error"]
    assert s["resume"] == "slm flan eval --held-out no-such-cluster"  # flan eval does not resume: it reruns


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_lines(root / "one" / "metrics.jsonl", [{"step": 10, "loss": 3.0}, {"step": 10, "val_loss": float("nan")}])
    (root / "one" / "config.json").write_text(json.dumps({"workflow": "pretrain", "train": {"steps": 20}}))
    (root / "one" / "result.json").write_text('{"accuracy": 0.5, "nll": Infinity}')
    (root / "one" / "big.json").write_bytes(b" " * (runs.RESULT_LIMIT + 1))
    (root / "one" / "leak.json").symlink_to("/etc/hostname")
    (root / "secret.json").write_text("{}")  # beside the runs, not in one
    (root / "alias").symlink_to(root / "one")  # a run directory linked under another name
    server = Server(None, port=0, runs_dir=root, api_key="k3y").start()
    yield server
    server.close()


def get(server, path, key="k3y", method="GET"):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=b"{}" if method == "POST" else None,
                 headers={"Authorization": f"Bearer {key}"} if key else {})
    res = conn.getresponse()
    body = res.read()
    conn.close()
    return res.status, res.getheader("Content-Type"), body


def test_dashboard_api_lists_and_serves_a_run(dashboard):
    status, kind, body = get(dashboard, "/api/runs")
    listing = json.loads(body)
    assert status == 200 and sorted(r["name"] for r in listing["runs"]) == ["alias", "one"]
    one = next(r for r in listing["runs"] if r["name"] == "one")
    assert (one["state"], one["step"], one["total"]) == ("unknown", 10, 20)
    assert json.loads(get(dashboard, "/api/runs/alias")[2])["name"] == "alias"
    detail = json.loads(get(dashboard, "/api/runs/one")[2])
    assert sorted(f["path"] for f in detail["files"]) == ["big.json", "leak.json", "result.json"]
    metrics = json.loads(get(dashboard, "/api/runs/one/metrics?offset=0")[2])  # NaN arrives as null
    assert metrics["rows"] == [{"step": 10, "loss": 3.0}, {"step": 10, "val_loss": None}]
    assert json.loads(get(dashboard, "/api/runs/one/files/result.json")[2]) == {"accuracy": 0.5, "nll": None}


@pytest.mark.parametrize("path, status", [
    ("/api/runs/one/files/..%2f..%2fsecret.json", 404), ("/api/runs/..%2fone", 404),
    ("/api/runs/one/files/%2e%2e/secret.json", 404), ("/api/runs/one/files/leak.json", 404),
    ("/api/runs/one/files/big.json", 404), ("/api/runs/one/files/config.json%00.png", 404),
    ("/api/runs/one/metrics?offset=-1", 400), ("/api/runs/one/metrics?offset=1e99", 400),
    ("/api/runs/one/metrics?stage=..", 404), ("/api/runs/nobody", 404), ("/api/runs/one/other", 404),
])
def test_dashboard_api_refuses_what_is_not_a_runs_file(dashboard, path, status):
    code, kind, body = get(dashboard, path)
    assert code == status and kind == "application/json" and json.loads(body)["error"]["message"]
    assert b"root:" not in body and b"localhost" not in body


def test_dashboard_pages_load_without_the_key_and_its_data_does_not(dashboard):
    for page in ("/", "/runs", "/web/runs.js", "/web/vendor/uPlot.iife.min.js"):
        assert get(dashboard, page, key=None)[0] == 200, page
    assert b"runs.js" in get(dashboard, "/", key=None)[2]  # without a model, / is the dashboard
    assert get(dashboard, "/api/runs", key=None)[0] == 401
    assert get(dashboard, "/api/runs", key="wrong")[0] == 401
    status, _, body = get(dashboard, "/v1/chat/completions", method="POST")
    assert status == 404 and b"no model" in body


def test_slm_dashboard_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "dashboard", str(tmp_path), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "runs dashboard for" in line, line
        url = line.split(" at ")[1].split(";")[0]
        host, port = url.removeprefix("http://").removesuffix("/runs").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/api/runs")
        assert json.loads(conn.getresponse().read()) == {"runs_dir": str(tmp_path), "runs": []}
        t0 = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0 and time.time() - t0 < 10
    finally:
        proc.kill()
