"""Remake the screenshots in docs/img/ from the running product, in headless Chromium (Debian's chromium +
chromedriver): the playground on the embedded model after one real exchange; the runs dashboard and the proofs page
over two short real pretraining runs (~1 minute each on 2 cores). Run: python scripts/screenshots.py"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from slmkit.models import load
from slmkit.serve import Server

OUT = Path(__file__).resolve().parents[1] / "docs" / "img"


def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        sys.exit("needs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def playground(driver, server) -> Path:
    driver.get(server.url.removesuffix("/v1") + "/")
    WebDriverWait(driver, 30).until(lambda d: server.name in d.find_element(By.ID, "model").text)
    driver.execute_script("document.getElementById('temperature').value = 0;"
                          "document.getElementById('max_tokens').value = 160;")
    driver.find_element(By.ID, "prompt").send_keys("Write a Python function that reverses a string, in a code "
                                                  "block, and explain it in one sentence.")
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .stats"))
    path = OUT / "playground.png"
    driver.save_screenshot(str(path))
    return path


def pretrain(project: Path, name: str, lr: str) -> None:
    """A short nano TinyLlama run through the CLI, so its record holds the command line as a user types it."""
    subprocess.run(["slm", "pretrain", "-m", "tinyllama-nano", "--data", "python-docs", "--tokenizer", "bpe:1024",
                    "--name", name, "--steps", "300", "--batch-size", "8", "--seq-len", "64", "--warmup-steps", "10",
                    "--lr", lr, "--eval-every", "50", "--log-every", "5"], check=True, stdout=subprocess.DEVNULL,
                   cwd=project)


def dashboard(driver, server) -> list[Path]:
    base = server.url.removesuffix("/v1")
    shots = []
    for page, ready, name in ((f"{base}/runs#run=tinyllama-nano", "#chart canvas", "dashboard.png"),
                              (f"{base}/proofs", "#proofs tr.claim", "proofs.png")):
        driver.get(page)
        WebDriverWait(driver, 60).until(lambda d, css=ready: d.find_elements(By.CSS_SELECTOR, css))
        time.sleep(1)  # the plots and images load after the first data
        driver.save_screenshot(str(OUT / name))
        shots.append(OUT / name)
    return shots


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    driver = browser()
    try:
        server = Server(load(None), port=0).start()
        try:
            print(playground(driver, server))
        finally:
            server.close()
        with tempfile.TemporaryDirectory() as project:
            pretrain(Path(project), "tinyllama-nano", "3e-3")
            pretrain(Path(project), "tinyllama-nano-lr1e-3", "1e-3")
            server = Server(None, port=0, runs_dir=Path(project) / "runs").start()
            try:
                print(*dashboard(driver, server), sep="\n")
            finally:
                server.close()
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
