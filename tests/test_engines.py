"""Shipping: GGUF export through llama.cpp's own converter and quantiser, parity with the PyTorch model, the
llama.cpp engine behind generate / chat / serve, engine choice, and the vLLM parameter mapping."""

import json

import pytest

from slmkit.errors import SlmError
from slmkit.generate import SamplingParams, generate, stream

llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs llama-cpp-python ([cpu-fast])")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_causal):
    """The tiny random Llama saved as an HF directory with the embedded tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny_causal.model.save_pretrained(out)
    tiny_causal.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_smol():
    from slmkit.engines import open_model

    return open_model(None, "llamacpp", progress=False)


def test_gguf_export_f32_matches_pytorch(tiny_dir, tmp_path):
    from slmkit.export import parity, to_gguf

    out = to_gguf(str(tiny_dir), tmp_path / "tiny-f32.gguf", "f32", progress=False)
    assert out.read_bytes()[:4] == b"GGUF"
    r = parity(str(tiny_dir), out, tokens=16)
    assert r["agree"] == 1.0 and r["agree_prefix"] == 16
    assert r["mean_abs_logit_delta"] < 1e-3  # same weights, same arithmetic up to float rounding


def test_gguf_quantised_export_is_smaller_and_runs(tiny_dir, tmp_path):
    from slmkit.export import to_gguf

    f16 = to_gguf(str(tiny_dir), tmp_path / "f16.gguf", "f16", progress=False)
    q4 = to_gguf(str(tiny_dir), tmp_path / "q4.gguf", "q4_k_m", progress=False)
    assert q4.stat().st_size < f16.stat().st_size
    llm = llama_cpp.Llama(str(q4), n_ctx=64, verbose=False)
    tokens = llm.tokenize(b"Hello world")
    assert len(list(zip(range(5), llm.generate(tokens, temp=0.0), strict=False))) == 5
    with pytest.raises(SlmError, match="unknown GGUF type 'q3'"):
        to_gguf(str(tiny_dir), tmp_path / "x.gguf", "q3")
    assert not (tmp_path / "x.gguf").exists()


def test_llamacpp_engine_generates_like_the_torch_path(llama_smol, smol):
    assert llama_smol.engine.name == "llamacpp" and llama_smol.model is None
    greedy = SamplingParams(max_new_tokens=12)
    [fast] = generate(llama_smol, ["What is the capital of France?"], greedy)
    [slow] = generate(smol, ["What is the capital of France?"], greedy)
    assert fast.prompt == slow.prompt and fast.prompt_tokens == slow.prompt_tokens  # one chat template, one tokenizer
    # llama.cpp quantises activations to 8 bits for the Q4_1 weights, so a chat answer's wording depends on the
    # CPU's kernels (seen: an AMD EPYC without AVX-512 answers in French); the plain completion is stable
    [paris] = generate(llama_smol, ["The capital of France is"], greedy, chat=False)
    assert "Paris" in paris.text
    # stop strings, the token limit and streaming go through the same text tracker as the torch path
    [cut] = generate(llama_smol, ["Count from 1 to 20: 1, 2, 3,"], SamplingParams(max_new_tokens=40, stop=["7"]),
                     chat=False)
    assert "7" not in cut.text and cut.finish_reason == "stop" and "5" in cut.text
    [long] = generate(llama_smol, ["Once upon a time"], SamplingParams(max_new_tokens=9, ignore_eos=True), chat=False)
    assert long.completion_tokens == 9 and long.finish_reason == "length"
    assert "".join(stream(llama_smol, "Once upon a time", SamplingParams(max_new_tokens=9, ignore_eos=True),
                          chat=False)) == long.text
    # a seed makes sampling reproducible; batches run prompt by prompt
    hot = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    a, b = generate(llama_smol, ["Tell me a story.", "Tell me a story."], hot)
    assert a.text == b.text


def test_auto_engine_choice(tiny_dir):
    from slmkit.engines import open_model, pick_engine

    assert pick_engine(None) == "llamacpp"  # the embedded default ships a GGUF
    assert pick_engine(str(tiny_dir)) == "torch"  # no GGUF yet: auto does not export behind the user's back
    loaded = open_model(str(tiny_dir), "llamacpp", progress=False)  # exports once, into the cache
    assert loaded.path.suffix == ".gguf" and loaded.path.is_file()
    assert pick_engine(str(tiny_dir)) == "llamacpp"
    with pytest.raises(SlmError, match="unknown engine 'fast'"):
        open_model(None, "fast")
    with pytest.raises(SlmError, match="random-initialised spec"):
        open_model("tinyllama-nano", "llamacpp")


def test_server_on_the_llamacpp_engine(llama_smol):
    from openai import OpenAI

    from slmkit.serve import SerialEngine, Server

    server = Server(llama_smol, port=0).start()
    try:
        assert isinstance(server.engine, SerialEngine)
        client = OpenAI(base_url=server.url, api_key="-")
        reply = client.chat.completions.create(model=server.name, max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content.strip() and reply.usage.completion_tokens <= 12
        plain = client.completions.create(model=server.name, prompt="The capital of France is", max_tokens=8,
                                          temperature=0)  # stable across CPUs (see above)
        assert "Paris" in plain.choices[0].text
        chunks = client.completions.create(model=server.name, prompt="Once upon a time", max_tokens=8, stream=True,
                                           extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text and server.engine.stats["requests"] == 3
    finally:
        server.close()


def test_vllm_mapping_and_clear_errors():
    from slmkit.engines import installed, open_model, vllm_sampling

    kwargs = vllm_sampling(SamplingParams(max_new_tokens=7, temperature=0.5, top_k=0, seed=2, ignore_eos=True))
    assert kwargs["max_tokens"] == 7 and kwargs["top_k"] == -1 and kwargs["seed"] == 2 and kwargs["ignore_eos"]
    if not installed("vllm"):
        with pytest.raises(SlmError, match="pip install 'slmkit\\[gpu\\]'"):
            open_model(None, "vllm")


def test_slm_export_command(tiny_dir, tmp_path):
    from test_cli import slm

    from slmkit.engines import installed

    r = slm("export", str(tiny_dir), "--quant", "f16", "--out", str(tmp_path / "t.gguf"), "--tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "GGUF (f16" in r.stdout and "parity vs PyTorch" in r.stdout
    report = json.loads((tmp_path / "t.parity.json").read_text())
    assert report["tokens"] == 8 and report["mean_abs_logit_delta"] < 0.05
    if not installed("optimum"):
        r = slm("export", str(tiny_dir), "--to", "onnx", "--out", str(tmp_path / "onnx"))
        assert r.returncode == 1 and "pip install optimum-onnx" in r.stderr
