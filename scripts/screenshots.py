"""Remake the screenshots in docs/img/ from the running product: a server on the embedded model, the page in
headless Chromium (Debian's chromium + chromedriver), one real exchange. Run: python scripts/screenshots.py"""

import shutil
import sys
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


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    server = Server(load(None), port=0).start()
    driver = browser()
    try:
        print(playground(driver, server))
    finally:
        driver.quit()
        server.close()


if __name__ == "__main__":
    main()
