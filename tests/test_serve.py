"""The OpenAI-compatible server, exercised with the real `openai` client over loopback, its continuous-batching
engine (rows joining and leaving mid-flight must not change any row's output) and the endpoint client."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import at_once

from slmkit.batching import BatchEngine
from slmkit.client import Endpoint, RemoteLM, open_lm
from slmkit.errors import SlmError
from slmkit.generate import SamplingParams, generate
from slmkit.serve import Server


def run_engine(engine, jobs):
    """Submit (prompt, max_new_tokens, delay_tokens) jobs: each waits until the previous one has produced
    `delay_tokens` tokens, so requests join a batch that is already decoding. Returns each job's text."""
    events = queue.Queue()
    texts, done, produced = {}, set(), {}
    for i, (prompt, max_new, _) in enumerate(jobs):
        engine.submit(prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0), events,
                      templated=False, index=i)
        while i + 1 < len(jobs) and produced.get(i, 0) < jobs[i + 1][2] and i not in done:
            index, kind, payload = events.get(timeout=60)
            produced[index] = produced.get(index, 0) + (kind == "text")
            if kind == "done":
                done.add(index)
                texts[index] = payload
    while len(done) < len(jobs):
        index, kind, payload = events.get(timeout=60)
        if kind == "done":
            done.add(index)
            texts[index] = payload
    return [texts[i] for i in range(len(jobs))]


def test_continuous_batching_matches_one_at_a_time(tiny_causal):
    """Rows of different prompt lengths join while others decode and leave at different times; every row's
    greedy tokens equal those of generating it alone (fp32, so batching cannot change the argmax)."""
    jobs = [("def add(a, b):", 14, 0), ("The quick brown fox jumps over the lazy dog because", 5, 3),
            ("x", 10, 2), ("import numpy as np\nimport torch", 8, 1)]
    engine = BatchEngine(tiny_causal, max_batch=3)
    try:
        results = run_engine(engine, jobs)
    finally:
        engine.close()
    assert engine.stats["max_batch_seen"] == 3  # the batch filled up and the fourth request waited
    for (prompt, max_new, _), result in zip(jobs, results, strict=True):
        alone = generate(tiny_causal, [prompt], SamplingParams(max_new_tokens=max_new, ignore_eos=True), chat=False)
        assert result.completion_tokens == max_new
        assert result.text == alone[0].text


def test_complete_many_batches_continuously_in_prompt_order(tiny_causal):
    """The library path to the same engine: more prompts than rows, each answer in its prompt's place and
    equal to generating it alone; a bad prompt stops with its index."""
    from slmkit.batching import complete_many

    prompts = ["def add(a, b):", "x", "The quick brown fox jumps over", "import torch"]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (9, 3, 6, 12)]
    done = []
    results = complete_many(tiny_causal, prompts, params, max_batch=2, on_done=lambda i, _: done.append(i))
    assert sorted(done) == [0, 1, 2, 3] and [r.completion_tokens for r in results] == [9, 3, 6, 12]
    for prompt, p, result in zip(prompts, params, results, strict=True):
        assert result.text == generate(tiny_causal, [prompt], p, chat=False)[0].text
    with pytest.raises(SlmError, match="prompt 1: the prompt is empty"):
        complete_many(tiny_causal, ["a", ""], [SamplingParams(max_new_tokens=2)] * 2)


def test_repeated_prompts_reuse_their_prefill(tiny_causal):
    """N samples of one prompt (best-of-N): the prompt runs once, later rows start from a copy of its kept
    cache, and every row still equals generating it alone; the kept cache is never changed by its copies."""

    prompts = ["def add(a, b):"] * 3 + ["x", "def add(a, b):", "x"]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 7, 2, 5, 6, 3)]
    engine = BatchEngine(tiny_causal, max_batch=2)
    try:
        events = queue.Queue()
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.submit(prompt, p, events, templated=False, index=i)
        results = {}
        while len(results) < len(prompts):
            index, kind, payload = events.get(timeout=60)
            if kind == "done":
                results[index] = payload
    finally:
        engine.close()
    assert engine.stats["prefills_reused"] == 4 and engine.stats["requests"] == 6
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        assert results[i].completion_tokens == p.max_new_tokens
        assert results[i].text == generate(tiny_causal, [prompt], p, chat=False)[0].text


def test_seq2seq_requests_are_batched(tiny_seq2seq):
    engine = BatchEngine(tiny_seq2seq)
    try:
        results = run_engine(engine, [("translate: hello", 6, 0), ("a longer input sentence here", 4, 0)])
    finally:
        engine.close()
    for prompt, result in zip(["translate: hello", "a longer input sentence here"], results, strict=True):
        alone = generate(tiny_seq2seq, [prompt], SamplingParams(max_new_tokens=result.completion_tokens,
                                                                ignore_eos=True), chat=False)
        assert result.text == alone[0].text


@pytest.fixture(scope="module")
def server(smol):
    srv = Server(smol, port=0, max_batch=8).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def ask(client, server, content, **kw):
    return client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": content}],
                                          **{"temperature": 0, "max_tokens": 24, **kw})


def test_openai_chat_stream_and_completions(client, server):
    assert [m.id for m in client.models.list().data] == [server.name]
    r = ask(client, server, "What is the capital of France?")
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0
    chunks = list(ask(client, server, "What is the capital of France?", stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # streaming and not streaming agree
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    c = client.completions.create(model=server.name, prompt=["1, 2, 3, 4,", "Monday, Tuesday,"], max_tokens=6,
                                  temperature=0, stop=["\n"])
    assert [ch.index for ch in c.choices] == [0, 1]
    assert c.choices[0].text.strip().startswith("5") and "Wednesday" in c.choices[1].text
    assert c.choices[0].finish_reason in ("stop", "length") and "\n" not in c.choices[0].text
    r = ask(client, server, "Tell me a story.", max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_sampling_n_and_seed(client, server):
    r = ask(client, server, "Name a fruit.", temperature=1.0, n=3, seed=7, max_tokens=12)
    again = ask(client, server, "Name a fruit.", temperature=1.0, n=3, seed=7, max_tokens=12)
    assert len(r.choices) == 3
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]


def test_openai_style_errors(client, server):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    for bad in ({"temperature": 5}, {"max_tokens": 0}, {"top_p": "high"}, {"stop": ["a", "b", "c", "d", "e"]},
                {"presence_penalty": 0.5}):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, server, "hi", **bad)
        assert e.value.body["param"] == next(iter(bad))
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, server, "word " * 9000)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=server.name, messages=[{"role": "robot", "content": "hi"}])
    request = urllib.request.Request(server.url + "/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_concurrent_clients_are_batched(client, server):
    before = server.engine.stats["max_batch_seen"]
    results, errors = at_once(lambda i: ask(client, server, f"Write one sentence about the number {i}.",
                                            max_tokens=16), 6)
    assert not errors and len(results) == 6
    assert all(r.choices[0].message.content for r in results.values())
    assert server.engine.stats["max_batch_seen"] >= max(before, 2)


def test_endpoint_client_and_remote_teacher(server, tmp_path):
    endpoint = Endpoint.parse(server.url)  # no "#model": the server's first model
    lm = RemoteLM(endpoint)
    texts = lm.generate(["What is the capital of France?", "What is the capital of Italy?"],
                        SamplingParams(max_new_tokens=16))
    assert "Paris" in texts[0] and "Rom" in texts[1]  # the small model answers "Roma" in Italian
    assert endpoint.model == server.name
    assert lm.choose(["The capital of France is", "The capital of Italy is"], [" Berlin", " Paris", " Rome"]) == [1, 2]
    assert "Paris" in Endpoint.parse(server.url.removesuffix("/v1") + "#" + server.name).complete(
        "The capital of France is", SamplingParams(max_new_tokens=4))
    with pytest.raises(SlmError, match="HTTP 404.*does not exist"):
        Endpoint.parse(server.url + "#gpt-4").chat([{"role": "user", "content": "hi"}], SamplingParams())

    from slmkit.data.synthesize import synthesize

    out = tmp_path / "synthetic.jsonl"
    s = synthesize("fractions", out, teacher=server.url, kinds=("textbook",), max_new_tokens=24, progress=False)
    assert s["written"] == 1 and json.loads(out.read_text())["topic"] == "fractions"


def test_endpoint_retries_then_fails_clearly():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = Endpoint.parse(f"http://127.0.0.1:{port}/v1#m", retries=2, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(SlmError, match="cannot reach the endpoint .* after 3 attempts"):
        endpoint.chat([{"role": "user", "content": "hi"}], SamplingParams())
    assert time.perf_counter() - start < 5
    assert isinstance(open_lm(f"http://127.0.0.1:{port}"), RemoteLM)


def test_api_key_is_required_when_set(smol):
    srv = Server(smol, port=0, api_key="secret").start()
    try:
        with pytest.raises(SlmError, match="HTTP 401"):
            Endpoint.parse(srv.url, api_key="wrong", retries=0).models()
        assert Endpoint.parse(srv.url, api_key="secret").models() == [srv.name]
    finally:
        srv.close()


def test_slm_serve_command(tmp_path):
    """`slm serve` as users start it: a real process on a free port, answering over HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", "--port", str(port), "--served-name",
                             "smol"], stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        lines = [proc.stderr.readline()]  # the first run may export the model for llama.cpp first
        while lines[-1] and "serving" not in lines[-1]:
            lines.append(proc.stderr.readline())
        assert f"serving smol at http://127.0.0.1:{port}/v1" in lines[-1], lines
        endpoint = Endpoint(f"http://127.0.0.1:{port}/v1", "smol")
        assert endpoint.models() == ["smol"]
        assert endpoint.chat([{"role": "user", "content": "What is the capital of France?"}],
                             SamplingParams(max_new_tokens=12)).strip()
        # `slm serve` picks llama.cpp for the embedded model when it is installed; its chat wording depends on
        # the CPU's kernels (tests/test_engines.py), a plain completion does not
        assert "Paris" in endpoint.complete("The capital of France is", SamplingParams(max_new_tokens=8))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
