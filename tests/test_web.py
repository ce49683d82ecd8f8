"""The playground `slm serve` shows at `/`, used as a person would: headless Chromium from Debian's packages,
driven by Selenium through Debian's chromedriver (nothing is downloaded), against a real server on the
embedded model."""

import http.client
import json
import time

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from slmkit.serve import Server


@pytest.fixture(scope="module")
def server(smol):
    srv = Server(smol, port=0, max_batch=4).start()
    yield srv
    srv.close()


def open_page(browser, server):
    browser.get(server.url.removesuffix("/v1") + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server.url.removesuffix("/v1") + "/")
    WebDriverWait(browser, 30).until(lambda d: server.name in d.find_element(By.ID, "model").text)


def set_field(browser, field_id, value):
    browser.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                           "e.dispatchEvent(new Event('change'));", field_id, str(value))


def ask(browser, text):
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def messages(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#messages .message")


def idle(browser):
    return not browser.find_element(By.ID, "stop-button").is_displayed()


def shown(browser) -> dict:
    """The conversation as the page shows it, read in one script call: a streaming reply replaces its element
    on every piece, so reading elements one by one can hold a stale one."""
    return browser.execute_script("""
        const messages = [...document.querySelectorAll('#messages .message')];
        return {texts: messages.map(m => (m.querySelector('.body') || m).textContent),
                stats: messages.map(m => { const s = m.querySelector('.stats'); return s ? s.textContent : null; }),
                busy: !document.getElementById('stop-button').hidden};""")


def wait(browser, condition, seconds=60) -> dict:
    """Wait until the page satisfies `condition`; return what it shows then."""
    def check(driver):
        page = shown(driver)
        return page if condition(page) else False

    return WebDriverWait(browser, seconds).until(check)


def test_a_question_gets_a_streamed_answer(browser, server):
    open_page(browser, server)
    assert not browser.find_element(By.ID, "attach-label").is_displayed()  # a text model takes no pictures
    assert idle(browser)  # Stop shows only while a reply streams
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 40)
    ask(browser, "What is the capital of France?")
    lengths = []
    deadline = time.time() + 120
    while time.time() < deadline:
        page = shown(browser)
        if len(page["texts"]) == 2:
            lengths.append(len(page["texts"][1]))
        if not page["busy"] and len(page["texts"]) == 2 and page["stats"][1]:
            break
        time.sleep(0.05)
    answer = messages(browser)[1]
    assert "Paris" in answer.find_element(By.CSS_SELECTOR, ".body").text
    growing = sorted(set(n for n in lengths if n))
    assert len(growing) >= 3, f"the answer appeared at once, not streamed: {growing}"  # text arrived in pieces
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
    assert "tok/s" in stats and "prompt +" in stats
    saved = browser.execute_script("return JSON.parse(localStorage.getItem('slmkit.conversations'))")
    assert saved[0]["messages"][0]["content"] == "What is the capital of France?"  # kept in the browser
    assert "Paris" in saved[0]["messages"][1]["content"] and saved[0]["messages"][1]["stats"] == stats


def test_stop_halts_and_regenerate_replaces(browser, server):
    open_page(browser, server)
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 400)
    ask(browser, "Write a long story about a lighthouse keeper.")
    wait(browser, lambda page: len(page["texts"]) == 2 and len(page["texts"][1]) > 20)
    browser.find_element(By.ID, "stop-button").click()
    WebDriverWait(browser, 10).until(idle)
    stopped = messages(browser)[1]
    assert stopped.find_element(By.CSS_SELECTOR, ".stats").text == "stopped"
    text = stopped.find_element(By.CSS_SELECTOR, ".body").text
    time.sleep(1.0)
    assert messages(browser)[1].find_element(By.CSS_SELECTOR, ".body").text == text  # nothing more arrives
    WebDriverWait(browser, 10).until(lambda d: server.active == 0 and server.engine.waiting.qsize() == 0)

    set_field(browser, "max_tokens", 12)
    set_field(browser, "temperature", 1.0)
    set_field(browser, "seed", 5)
    regenerate = [b for b in messages(browser)[1].find_elements(By.TAG_NAME, "button") if b.text == "Regenerate"]
    regenerate[0].click()
    page = wait(browser, lambda page: not page["busy"] and len(page["texts"]) == 2 and page["stats"][1]
                and "tok/s" in page["stats"][1])
    assert len(page["texts"]) == 2  # replaced, not added
    assert page["texts"][1].strip() and page["texts"][1].strip() != text


def test_edit_a_past_message_resends_from_there(browser, server):
    open_page(browser, server)
    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 24)
    ask(browser, "What is the capital of Italy?")
    wait(browser, lambda page: not page["busy"] and len(page["texts"]) == 2 and page["stats"][1])
    [b for b in messages(browser)[0].find_elements(By.TAG_NAME, "button") if b.text == "Edit"][0].click()
    area = messages(browser)[0].find_element(By.TAG_NAME, "textarea")
    area.clear()
    area.send_keys("What is the capital of France?")
    [b for b in messages(browser)[0].find_elements(By.TAG_NAME, "button") if b.text == "Save and send"][0].click()
    page = wait(browser, lambda page: not page["busy"] and len(page["texts"]) == 2 and page["stats"][1])
    assert "France" in page["texts"][0] and "Paris" in page["texts"][1]


def test_a_reply_with_html_renders_inert(browser, server, tmp_path):
    """A conversation (imported, as a model could have written it) whose reply holds a script, an image with
    onerror and markdown: the markdown renders, the HTML shows as text and runs nothing."""
    open_page(browser, server)
    hostile = ('**bold** and `code`\n\n<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
               '\n\n[link](javascript:window.pwned=3)')
    conversation = {"id": "c1", "title": "hostile", "messages": [{"role": "user", "content": "hi <b>there</b>"},
                                                                   {"role": "assistant", "content": hostile}]}
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([conversation, {"id": "bad"}]))
    browser.find_element(By.ID, "import").send_keys(str(path))
    WebDriverWait(browser, 10).until(lambda d: len(messages(d)) == 2)
    assert "imported 1 conversation(s), skipped 1" in browser.find_element(By.ID, "status").text
    reply = messages(browser)[1].find_element(By.CSS_SELECTOR, ".body")
    assert reply.find_element(By.TAG_NAME, "strong").text == "bold"
    assert not reply.find_elements(By.TAG_NAME, "img") and not reply.find_elements(By.TAG_NAME, "script")
    assert '<img src=x onerror="window.pwned=1">' in reply.text and "<script>" in reply.text
    for link in reply.find_elements(By.TAG_NAME, "a"):
        assert not link.get_attribute("href").startswith("javascript:")
    assert messages(browser)[0].find_elements(By.TAG_NAME, "b") == []  # user text is text too
    time.sleep(0.5)
    assert browser.execute_script("return window.pwned === undefined")


def test_server_errors_show_as_messages(browser, server):
    open_page(browser, server)
    set_field(browser, "max_tokens", 10 ** 9)
    ask(browser, "Hello")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.error"))
    error = browser.find_element(By.CSS_SELECTOR, "#messages .message.error").text
    assert error.startswith("400: ") and "max_tokens" in error


def test_the_page_asks_for_the_api_key(browser, smol):
    srv = Server(smol, port=0, max_batch=2, api_key="s3cret").start()
    try:
        browser.get(srv.url.removesuffix("/v1") + "/")
        alert = WebDriverWait(browser, 20).until(expected_conditions.alert_is_present())
        alert.send_keys("s3cret")
        alert.accept()
        WebDriverWait(browser, 20).until(lambda d: srv.name in d.find_element(By.ID, "model").text)
    finally:
        srv.close()


def raw_get(server, path):
    host, port = server.url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def test_static_files_are_served_safely(server):
    status, headers, body = raw_get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = raw_get(server, "/web/vendor/markdown-it.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"markdownit" in body
    for path in ("/web/../serve.py", "/web/%2e%2e/serve.py", "/web/vendor/../../serve.py", "/web/nope.js",
                 "/web/", "/web/vendor/LICENSE.markdown-it/x", "/web//etc/passwd", "/web/\x00.js"):
        status, _, body = raw_get(server, path.replace("\x00", "%00"))
        assert status == 404 and json.loads(body)["error"]["message"].startswith("unknown path"), path
