"""The runs dashboard and the proofs page used as a person would, in headless Chromium: a real training run started
by the test appears as running, its curve gains points while it trains (no reload), a kill shows as interrupted with
the command that resumes it, the comparison view overlays two runs, and a proof's figure comes from the result file
a run wrote."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from slmkit.methods.pretrain import pretrain
from slmkit.proofs import pretraining
from slmkit.proofs import verdict as proof_verdict
from slmkit.serve import Server
from slmkit.train import TrainArgs


@pytest.fixture
def training(tmp_path):
    """A pretraining run in its own process, slow enough to watch: a point every 2 steps, 2,000 steps."""
    args = [sys.executable, "-m", "slmkit.cli", "pretrain", "-m", "tinyllama-nano", "--data", "python-docs",
            "--tokenizer", "bpe:1024", "--name", "live", "--runs-dir", str(tmp_path), "--steps", "2000",
            "--batch-size", "4", "--seq-len", "64", "--log-every", "2", "--eval-every", "20", "--save-every", "20"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def page(browser) -> dict:
    return browser.execute_script("""
        const row = (name) => document.querySelector(`#runs tr[data-run="${name}"]`);
        const text = (id) => document.getElementById(id).textContent;
        return {live: row('live') ? row('live').textContent : null,
                points: Number(document.getElementById('chart').dataset.points || 0),
                summary: text('run-summary'), resume: text('run-resume'),
                compared: Number(document.getElementById('compare-chart').dataset.points || 0),
                marker: window.testMarker || null};""")


def test_dashboard_follows_a_training_run(browser, tmp_path, training):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 7 - s / 100}) + "\n"
                                                   for s in range(10, 110, 10)))
    server = Server(None, port=0, runs_dir=tmp_path).start()
    wait = WebDriverWait(browser, 180, poll_frequency=0.2)
    try:
        browser.get(server.url.removesuffix("/v1") + "/runs")
        wait.until(lambda d: page(d)["live"] and "running" in page(d)["live"])
        browser.find_element(By.LINK_TEXT, "live").click()
        browser.execute_script("window.testMarker = 'same page'")
        wait.until(lambda d: page(d)["points"] >= 3)
        first = page(browser)["points"]
        wait.until(lambda d: page(d)["points"] >= first + 3)  # the curve grows while the run trains
        assert page(browser)["marker"] == "same page" and "running" in page(browser)["summary"]
        assert "ETA" in page(browser)["summary"]

        os.killpg(training.pid, signal.SIGKILL)
        training.wait()
        wait.until(lambda d: "interrupted" in page(d)["summary"])
        wait.until(lambda d: "--resume" in page(d)["resume"])
        assert "--name live" in page(browser)["resume"] and "--steps 2000" in page(browser)["resume"]

        browser.get(server.url.removesuffix("/v1") + "/runs#compare=live,earlier")
        wait.until(lambda d: page(d)["compared"] > 10)  # both runs' points on one chart
        legend = browser.find_element(By.ID, "compare-chart").text
        assert "live train" in legend and "earlier train" in legend
    finally:
        server.close()


def test_proofs_page_shows_the_figure_a_run_wrote(browser, tmp_path):
    """A real (short) TinyLlama-nano pretraining writes pretrain.json; the proofs page shows its perplexity beside
    the unigram baseline, with a verdict and a link to the run."""
    s = pretrain("tinyllama-nano", "python-docs", tokenizer="bpe:1024", run="tinyllama-nano", runs_dir=tmp_path,
                 train_args=TrainArgs(steps=20, batch_size=4, seq_len=64, eval_every=0, save_every=0, log_every=5),
                 progress=False)
    server = Server(None, port=0, runs_dir=tmp_path).start()
    try:
        browser.get(server.url.removesuffix("/v1") + "/proofs")
        card = '#proofs section[data-key="tinyllama"]'
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} tr.claim"))
        figures = browser.find_element(By.CSS_SELECTOR, f"{card} td.figures").text
        model, unigram = (float(x) for x in re.findall(r"\d+\.\d+|\d+", figures)[:2])
        [c] = pretraining(s, tmp_path / "tinyllama-nano" / "pretrain.json")  # the per-token NLLs and their interval
        assert model == pytest.approx(c["arms"]["model"], abs=1e-3) and unigram == pytest.approx(c["arms"]["unigram"],
                                                                                                   abs=1e-3)
        verdict = browser.find_element(By.CSS_SELECTOR, f"{card} tr.claim .state").text
        assert verdict == proof_verdict(c) and c["difference_interval"] is not None
        assert browser.find_element(By.CSS_SELECTOR, f"{card} a").get_attribute("href").endswith(
            "/runs#run=tinyllama-nano")
        others = browser.find_element(By.CSS_SELECTOR, '#proofs section[data-key="flame"]').text
        assert "Not run on this machine" in others and "slm flame eval" in others
    finally:
        server.close()
