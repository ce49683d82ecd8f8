"""The proofs registry and its verdicts: every proof's commands name real recipes that write the result file it
reads, intervals are the standard ones, and a claim holds only when its interval says so."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slmkit import proofs
from slmkit.proofs import PROOFS, bootstrap_interval, claim, seed_interval
from slmkit.runs import record_workflow

ROOT = Path(__file__).resolve().parents[1]


def test_every_proof_runs_recipes_that_write_the_file_it_reads():
    assert len({p.key for p in PROOFS}) == len(PROOFS) == 17 and len({p.system for p in PROOFS}) == 17
    for p in PROOFS:
        assert (ROOT / p.doc).is_file(), p.doc
        writes = set()  # the run directory each recipe writes, with the command's --set overrides
        for command in p.commands:
            if command.startswith("slm run "):
                words = shlex.split(command)
                assert (ROOT / words[2]).is_file(), words[2]
                spec = yaml.safe_load((ROOT / words[2]).read_text())
                spec.update(dict(s.split("=", 1) for s in words[4::2]))
                writes.add(spec.get("run") or Path(spec.get("out_dir", "")).name)
        assert p.result.split("/")[0] in writes, p.key
    # the domain models' eval commands read the trained model, and write beside it, where the proofs look
    from slmkit.domains.flame.model import TRAINED as FLAME
    from slmkit.domains.llava_phi.evaluate import TRAINED as LLAVA
    from slmkit.domains.slade.model import TRAINED as SLADE

    results = {p.key: p.result for p in PROOFS}
    for key, trained in (("flame", FLAME), ("slade", SLADE), ("llava-phi", LLAVA)):
        assert f"runs/{results[key]}".startswith(trained + "/"), key


def test_intervals_are_the_standard_ones():
    low, high = seed_interval([0.9, 0.8, 0.7], [0.8, 0.6, 0.4])  # differences 0.1, 0.2, 0.3
    half = 4.303 * 0.1 / 3 ** 0.5  # t(0.975, 2 degrees of freedom) x sd / sqrt(n)
    assert (low, high) == pytest.approx((0.2 - half, 0.2 + half))
    assert seed_interval([0.9], [0.8]) is None  # one seed: no interval
    assert bootstrap_interval([1.0] * 50, [0.0] * 50) == [1.0, 1.0]
    # per task: items resampled within their task, the difference of the mean of task means (here always 0.5)
    assert bootstrap_interval({"a": [1, 1], "b": [0, 0, 0, 0]}, {"a": [0, 0], "b": [0, 0, 0, 0]}) == [0.5, 0.5]
    # weighted by tokens: a per-token mean, not a per-record one
    low, high = bootstrap_interval([3.0, 1.0], [1.0, 1.0], weights=[1, 3])  # per-token difference 0.5 observed
    assert low <= 0.5 <= high and bootstrap_interval([2.0, 2.0], [0.0, 0.0], weights=[1, 9]) == [2.0, 2.0]
    wins = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_interval(wins, [0.0] * 100)  # a proportion of 0.3 over 100 items: about +-0.09
    assert 0.19 < low < 0.23 and 0.37 < high < 0.41


@pytest.mark.parametrize("interval, lower, holds", [
    ([0.01, 0.2], False, True), ([-0.1, 0.2], False, None), ([-0.3, -0.1], False, False),
    ([-0.3, -0.1], True, True), ([0.1, 0.3], True, False), (None, False, None),
])
def test_a_claim_holds_only_when_its_interval_excludes_zero_the_claimed_way(interval, lower, holds):
    arms = {"a": 0.5, "b": 0.6 if lower else 0.4}
    c = claim("a beats b", "m", arms, "a", "b", lower_is_better=lower, interval=interval)
    assert c["holds"] is holds
    # without an interval, figures pointing the wrong way already refute the claim
    assert claim("a beats b", "m", {"a": 0.4, "b": 0.5}, "a", "b")["holds"] is False


def test_slm_proofs_reads_result_files_and_says_what_is_not_run(tmp_path):
    run = tmp_path / "pet-spam-smollm2"
    run.mkdir()
    per_seed = [{"seed": s, "fine-tuning": f, "pet": p} for s, f, p in ((0, 0.80, 0.90), (1, 0.82, 0.93),
                                                                           (2, 0.85, 0.91))]
    (run / "pet.json").write_text(json.dumps({"mean": {"fine-tuning": 0.823, "pet": 0.913}, "per_seed": per_seed}))
    (tmp_path / "ul2r-nano").mkdir()
    (tmp_path / "ul2r-nano" / "ul2r.json").write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "proofs", "--runs-dir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {row["key"]: row for row in json.loads(r.stdout)}
    [c] = rows["pet"]["claims"]
    assert c["arms"] == {"pet": 0.913, "fine-tuning": 0.823} and c["holds"] is True  # every seed: +0.06..+0.10
    assert c["difference_interval"] == pytest.approx(seed_interval([0.90, 0.93, 0.91], [0.80, 0.82, 0.85]))
    assert "ul2r.json could not be read" in rows["ul2r"]["error"] and rows["ul2r"]["claims"] == []
    assert rows["flame"]["measured"] is None and rows["flame"]["commands"][-1] == "slm flame eval"
    table = subprocess.run([sys.executable, "-m", "slmkit.cli", "proofs", "--runs-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert "PET beats plain fine-tuning" in table.stdout and "holds" in table.stdout
    assert proofs.verdict(c) == "holds"


def test_recording_a_proof_commits_its_claims_with_their_provenance(tmp_path):
    run = tmp_path / "runs" / "pet-spam-smollm2"
    run.mkdir(parents=True)
    per_seed = [{"seed": s, "fine-tuning": 0.8, "pet": 0.9 + s / 100} for s in range(3)]
    (run / "pet.json").write_text(json.dumps({"mean": {"fine-tuning": 0.8, "pet": 0.91}, "per_seed": per_seed}))
    record_workflow(run, {"event": "start", "command": "pet", "argv": ["run", "recipes/pet-spam-smollm2.yaml"],
                          "source": {"commit": "abc123", "dirty": False}})
    record_workflow(run, {"event": "end", "state": "finished"})
    (run / "pet.png").write_bytes(b"\x89PNG\r\n\x1a\nthe plot")

    def slm(*args):
        return subprocess.run([sys.executable, "-m", "slmkit.cli", "proofs", "--runs-dir", str(tmp_path / "runs"),
                               "--results-dir", str(tmp_path / "results"), *args], capture_output=True, text=True,
                              timeout=120)

    r = slm("--record", "pet", "--json")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "results" / "pet.json").read_text())
    assert saved["ran"] == "slm run recipes/pet-spam-smollm2.yaml" and saved["source"]["commit"] == "abc123"
    assert saved["machine"]["cores"] >= 1 and saved["claims"][0]["arms"] == {"pet": 0.91, "fine-tuning": 0.8}
    assert saved["plot"] == "pet.png" and (tmp_path / "results" / "pet.png").read_bytes().endswith(b"the plot")
    rows = {row["key"]: row for row in json.loads(slm("--json").stdout)}
    assert rows["pet"]["reference"] == saved["claims"] == rows["pet"]["claims"]  # shown beside the measured ones
    for bad, message in (("flame", "proof flame: nothing to record (not measured here: run slm flame data"),
                         ("nope", "no proof nope")):
        r = slm("--record", bad)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
