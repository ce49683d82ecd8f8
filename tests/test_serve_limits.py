"""The server as a careless or hostile client meets it: oversize and malformed bodies, clients that leave
mid-request, a long request beside short ones, a full queue, the wall-time, 64 streams at once, and SIGTERM or
SIGINT under load. Every answer is one OpenAI-shaped JSON error (or an error event mid-stream) and the server
keeps serving. A tiny random model with a long context makes long requests cheap."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import at_once, saved, tiny_llama

from slmkit.api import Limits
from slmkit.generate import SamplingParams, generate
from slmkit.serve import Server

LONG = 4000  # tokens: seconds of work for the tiny model (within the default max_tokens cap)


@pytest.fixture(scope="module")
def long_tiny(tokenizer):
    """The tiny random Llama with an 8K context."""
    return tiny_llama(tokenizer, context=8192, name="long-tiny")


@pytest.fixture
def serving(long_tiny):
    """Start servers with given limits; all are closed after the test."""
    started = []

    def start(**kw):
        limits = Limits(**{k: kw.pop(k) for k in list(kw) if hasattr(Limits, k)})
        started.append(Server(long_tiny, port=0, limits=limits, **kw).start())
        return started[-1]

    yield start
    for srv in started:
        srv.close()


def address(srv):
    return srv.httpd.server_address[:2]


def exchange(srv, data: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one HTTP response: (status, headers, body)."""
    with socket.create_connection(address(srv), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body


def post(srv, body, path="/v1/completions", extra: bytes = b"") -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, headers, raw = exchange(srv, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                         b"Content-Length: %d\r\n%s\r\n%s" % (path.encode(), len(data), extra, data))
    return status, headers, json.loads(raw)


def start_stream(srv, body: dict) -> socket.socket:
    """Open a streaming request and return its socket once the response has begun."""
    data = json.dumps({**body, "stream": True}).encode()
    s = socket.create_connection(address(srv), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    assert s.recv(12).startswith(b"HTTP/1.1 200")
    return s


def wait_for(condition, timeout: float = 20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


LONG_BODY = {"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True, "temperature": 0}


def test_oversize_and_malformed_requests_get_one_json_error_each(serving):
    srv = serving(max_body_bytes=4096, max_prompts=4, max_tokens_cap=100)
    t0 = time.monotonic()
    status, headers, body = exchange(srv, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 52428800\r\n\r\n{")
    assert status == 413 and headers["connection"] == "close"  # refused by its declared size, before reading it
    assert json.loads(body)["error"]["code"] == "request_too_large" and time.monotonic() - t0 < 5
    status, _, body = exchange(srv, b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello")
    assert status == 411 and "Content-Length" in json.loads(body)["error"]["message"]
    status, _, body = exchange(srv, b"POST /v1/completions HTTP/1.1\r\nContent-Length: lots\r\n\r\n")
    assert status == 400 and "Content-Length" in json.loads(body)["error"]["message"]
    for raw, words in [(b"{not json", "not valid JSON"), (b"[" * 4000, "nested too deeply"),
                       (b'{"prompt": "x", "temperature": NaN}', "not valid JSON"), (b"[1, 2]", "JSON object"),
                       (b'{"prompt": "\xff"}', "not valid JSON")]:
        status, _, body = post(srv, raw)
        assert status == 400 and words in body["error"]["message"], (raw[:20], body)
    bad = [({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": "x", "max_tokens": 101}, "max_tokens"),
           ({"prompt": "x", "n": 5}, "n"), ({"prompt": ["a", "b", "c"], "n": 2}, "prompt"),
           ({"prompt": "x", "stop": "s" * 300}, "stop"), ({"prompt": "x", "seed": 10**30}, "seed"),
           ({"prompt": "x", "stream": "yes"}, "stream"), ({"prompt": "x", "stream_options": [1]}, "stream_options")]
    for request, param in bad:
        status, _, body = post(srv, request)
        assert status == 400 and body["error"]["param"] == param, (request, body)
    chat = [([{"role": "user", "content": [{"type": "text", "text": 7}]}], "messages[0].content[0]"),
            ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
            ([{"content": "hi"}], "messages[0].role"), ([{"role": "user", "content": {"a": 1}}], "messages[0].content"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}],
             "messages[0].content[0]")]
    for messages, param in chat:
        status, _, body = post(srv, {"messages": messages}, "/v1/chat/completions")
        assert status == 400 and body["error"]["param"] == param, (messages, body)
        assert body["error"]["type"] == "invalid_request_error"
    for raw, code in [(b"PUT /v1/models HTTP/1.1\r\n\r\n", 501), (b"GET /v1/models HTTP/1.1 more\r\n\r\n", 400),
                      (b"GET /v1/nothing HTTP/1.1\r\n\r\n", 404)]:
        status, _, body = exchange(srv, raw)
        assert status == code and "message" in json.loads(body)["error"]
    srv.models = lambda: 1 / 0  # a bug behind an endpoint: a 500 in JSON, logged; the server goes on
    status, _, body = exchange(srv, b"GET /v1/models HTTP/1.1\r\n\r\n")
    assert status == 500 and "ZeroDivisionError" in json.loads(body)["error"]["message"]
    status, _, body = post(srv, {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_work_stops_when_the_client_leaves(serving):
    srv = serving()
    stats = srv.engine.stats
    # not streaming, three sibling choices: the socket is closed while they generate
    data = json.dumps({**LONG_BODY, "n": 3}).encode()
    s = socket.create_connection(address(srv))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    assert wait_for(lambda: stats["running"] == 3)
    s.close()
    assert wait_for(lambda: stats["running"] == 0 and srv.active == 0, timeout=5)
    assert stats["tokens"] < 3 * LONG
    # streaming: the client reads a little, then goes away
    s = start_stream(srv, LONG_BODY)
    s.recv(4096)
    s.close()
    assert wait_for(lambda: stats["running"] == 0 and srv.active == 0, timeout=5)
    tokens = stats["tokens"]
    time.sleep(0.5)
    assert stats["tokens"] == tokens  # nothing is generated for nobody


def test_a_long_request_does_not_hold_up_short_ones(serving):
    srv = serving()
    long = start_stream(srv, LONG_BODY)
    try:
        for _ in range(3):
            status, _, body = post(srv, {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True})
            assert status == 200 and body["usage"]["completion_tokens"] == 5
        assert wait_for(lambda: srv.engine.stats["running"] == 1, timeout=5)  # the long one is still going
        assert srv.engine.stats["tokens"] < LONG
    finally:
        long.close()


def test_a_full_queue_answers_429_with_retry_after(serving):
    srv = serving(max_batch=1, max_queue=1)
    first = start_stream(srv, LONG_BODY)
    assert wait_for(lambda: srv.engine.stats["running"] == 1)
    second = start_stream(srv, LONG_BODY)
    assert wait_for(lambda: srv.engine.waiting.qsize() == 1)
    status, headers, body = post(srv, {"prompt": "Hi", "max_tokens": 2})
    assert status == 429 and headers["retry-after"] == "1" and body["error"]["type"] == "rate_limit_error"
    first.close()
    second.close()
    assert wait_for(lambda: srv.engine.stats["running"] == 0 and srv.engine.waiting.qsize() == 0)
    status, _, body = post(srv, {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
    assert status == 200


def test_a_request_past_its_wall_time_ends_with_504(serving):
    srv = serving(timeout=1.0)
    t0 = time.monotonic()
    status, _, body = post(srv, LONG_BODY)
    assert status == 504 and body["error"]["code"] == "timeout" and time.monotonic() - t0 < 5
    s = start_stream(srv, LONG_BODY)
    received = b""
    while not received.endswith(b"data: [DONE]\n\n"):
        chunk = s.recv(65536)
        assert chunk, "the stream ended without [DONE]"
        received += chunk
    s.close()
    events = [json.loads(line[6:]) for line in received.decode().splitlines()
              if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "timeout"
    assert wait_for(lambda: srv.engine.stats["running"] == 0)


def test_64_concurrent_streams_all_complete_with_bounded_memory(serving, long_tiny):
    from openai import OpenAI

    srv = serving(max_batch=16)
    client = OpenAI(base_url=srv.url, api_key="-", max_retries=0, timeout=300)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def one(i):
        chunks = client.completions.create(model=srv.name, prompt=f"Request number {i}:", max_tokens=24,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    texts, errors = at_once(one, 64)
    assert not errors and len(texts) == 64
    assert srv.engine.stats["max_batch_seen"] == 16
    for i in (0, 17, 63):  # batching with 15 others changed no greedy token
        alone = generate(long_tiny, [f"Request number {i}:"], SamplingParams(max_new_tokens=24, ignore_eos=True),
                         chat=False)
        assert texts[i] == alone[0].text
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1_000_000  # KiB: under 1 GB more


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, long_tiny):
    return saved(long_tiny, tmp_path_factory.mktemp("long-tiny") / "model")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_under_load_closing_its_streams(tiny_dir, how):
    """`slm serve` as a service manager or a shell runs it: SIGTERM (docker stop, systemd) and SIGINT, even when
    started with SIGINT ignored (a shell's background job), stop it within 5 s; streams in flight end with an
    error event and [DONE]. Bound beyond loopback without a key, it warns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = "0.0.0.0" if how == "SIGINT" else "127.0.0.1"
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if how == "SIGINT" else None
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", "--model", str(tiny_dir), "--engine",
                             "torch", "--host", host, "--port", str(port)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"}, preexec_fn=ignore_sigint)
    try:
        lines = [proc.stderr.readline()]
        while lines[-1] and "serving" not in lines[-1]:
            lines.append(proc.stderr.readline())
        assert f":{port}/v1" in lines[-1], lines
        assert ("without an API key" in "".join(lines)) == (host != "127.0.0.1")
        srv = type("Address", (), {"httpd": type("H", (), {"server_address": ("127.0.0.1", port)})})
        streams = [start_stream(srv, LONG_BODY) for _ in range(4)]
        for s in streams:
            s.recv(4096)
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, how))
        assert proc.wait(timeout=10) == 0 and time.monotonic() - t0 < 5
        for s in streams:
            received = b""
            while chunk := s.recv(65536):
                received += chunk
            assert received.endswith(b"data: [DONE]\n\n") and b"shutting_down" in received
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in proc.stderr.read()
