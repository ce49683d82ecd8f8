"""Shipping: GGUF export through llama.cpp's own converter and quantiser, parity with the PyTorch model, the
llama.cpp engine behind generate / chat / serve, engine choice, and the vLLM parameter mapping."""

import json
import os

import pytest
from conftest import at_once, saved

from slmkit.errors import SlmError
from slmkit.generate import SamplingParams, generate, stream

llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs llama-cpp-python ([cpu-fast])")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_causal):
    """The tiny random Llama saved as an HF directory with the embedded tokenizer and chat template."""
    return saved(tiny_causal, tmp_path_factory.mktemp("tiny") / "model")


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
    assert llama_smol.path.name.endswith("-f16.gguf")  # the packaged Q4_1 file is not what runs
    greedy = SamplingParams(max_new_tokens=12)
    [fast] = generate(llama_smol, ["What is the capital of France?"], greedy)
    [slow] = generate(smol, ["What is the capital of France?"], greedy)
    assert fast.prompt == slow.prompt and fast.prompt_tokens == slow.prompt_tokens  # one chat template, one tokenizer
    assert fast.text == slow.text == "The capital of France is Paris."
    # stop strings, the token limit and streaming go through the same text tracker as the torch path
    [cut] = generate(llama_smol, ["Count from 1 to 20: 1, 2, 3,"], SamplingParams(max_new_tokens=40, stop=["7"]),
                     chat=False)
    assert "7" not in cut.text and cut.finish_reason == "stop" and "5" in cut.text
    [long] = generate(llama_smol, ["Once upon a time"], SamplingParams(max_new_tokens=9, ignore_eos=True), chat=False)
    assert long.completion_tokens == 9 and long.finish_reason == "length"
    assert "".join(stream(llama_smol, "Once upon a time", SamplingParams(max_new_tokens=9, ignore_eos=True),
                          chat=False)) == long.text
    # a seed makes sampling reproducible, also for prompts decoded together in one batch (one generator: the rows
    # draw different samples, as on the torch engine)
    hot = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    first = [c.text for c in generate(llama_smol, ["Tell me a story.", "Tell me a story."], hot)]
    assert [c.text for c in generate(llama_smol, ["Tell me a story.", "Tell me a story."], hot)] == first
    assert first[0] != first[1]


# (question, the fact its answer must carry): the torch fp32 engine answers each with its fact
FACTS = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
         ("Which planet is the largest in our solar system?", "Jupiter"),
         ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the chemical formula of water?", "H2O"),
         ("What is the capital of Germany?", "Berlin"), ("What is the largest ocean on Earth?", "Pacific"),
         ("Who developed the theory of relativity?", "Einstein")]


def test_default_engine_answers_what_the_model_answers(smol):
    """What `auto` picks for the embedded model: perplexity within 1% of torch fp32 on packaged text, the same
    fact in each greedy answer to eight questions, and the same answer whatever ran before (alone, after other
    requests, or in a batch beside them)."""
    from slmkit.engines import open_model
    from slmkit.evaluate import perplexity

    auto = open_model(None, "auto", progress=False)
    assert auto.engine is not None and auto.engine.name == "llamacpp"
    reference = perplexity(smol, "python-docs", tokens=2048, progress=False)["perplexity"]
    assert abs(perplexity(auto, "python-docs", tokens=2048, progress=False)["perplexity"] / reference - 1) < 0.01
    greedy = SamplingParams(max_new_tokens=30)
    questions = [q for q, _ in FACTS]
    truth = generate(smol, questions, greedy)
    answers = [generate(auto, [q], greedy)[0].text for q in questions]
    for (question, fact), want, got in zip(FACTS, truth, answers, strict=True):
        assert fact in want.text and fact in got, (question, want.text, got)
    together = [c.text for c in generate(auto, questions, greedy)]  # eight sequences in one llama.cpp batch
    assert together == answers
    assert [generate(auto, [q], greedy)[0].text for q in reversed(questions)] == answers[::-1]


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


def test_llamacpp_prompts_share_their_common_prefix(llama_smol):
    """A prompt that begins like a live sequence, or like a prompt decoded beside it, copies those KV cells and
    decodes only its own tail; its next-token logits are the ones it gets alone."""
    import torch

    from slmkit.llamacpp import MIN_SHARED, Sequences

    engine = llama_smol.engine
    engine.reserve(4, 1024)
    ctx = engine.context

    def chat(text):
        return llama_smol.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                        add_generation_prompt=True, return_dict=False)

    prompts = [chat(f"Write a short essay about {topic}.") for topic in ("bees", "owls", "salt")]
    shared = min(len(os.path.commonprefix([prompts[0], p])) for p in prompts[1:])
    assert shared >= MIN_SHARED  # the chat template and the words before the topic

    def prefill(group):
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        before = ctx.decoded
        seqs = Sequences(ctx, ids, mask)
        return seqs, seqs.prefill(ids)[:, -1], ctx.decoded - before

    alone = []
    for p in prompts:
        seqs, logits, decoded = prefill([p])
        assert decoded == len(p)  # nothing live to share with
        alone.append(logits[0])
        del seqs  # its cells are freed
    assert ctx.history == {}
    seqs, together, decoded = prefill(prompts)  # the first is decoded whole, the others copy its prefix
    assert decoded == len(prompts[0]) + sum(len(p) - shared for p in prompts[1:])
    assert torch.allclose(together, torch.stack(alone), atol=0.05)
    later, again, decoded = prefill([prompts[1]])  # shares with the live sequences
    assert decoded == 1  # the whole prompt is live: only its last token runs, for its logits
    assert torch.allclose(again[0], alone[1], atol=0.05) and again[0].argmax() == alone[1].argmax()
    del seqs, later
    assert ctx.history == {}


def test_server_on_the_llamacpp_engine(llama_smol):
    """Concurrent requests decode together in one llama.cpp context, each answering as it would alone."""
    from openai import OpenAI

    from slmkit.batching import BatchEngine
    from slmkit.serve import Server

    server = Server(llama_smol, port=0, max_batch=4).start()
    try:
        assert isinstance(server.engine, BatchEngine)
        client = OpenAI(base_url=server.url, api_key="-", max_retries=0)
        reply = client.chat.completions.create(model=server.name, max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content == "The capital of France is Paris."
        # questions the model answers decisively: f16 logits move by up to 0.05 with the batch around a row
        # (docs/serving.md), which may flip a near-tie such as the next number of a count, not these answers
        prompts = [q for q, _ in FACTS[:6]]
        alone = [generate(llama_smol, [p], SamplingParams(max_new_tokens=16))[0].text for p in prompts]

        def one(i):
            chunks = client.chat.completions.create(model=server.name, max_tokens=16, temperature=0, stream=True,
                                                    messages=[{"role": "user", "content": prompts[i]}])
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        texts, errors = at_once(one, 6)
        assert not errors and [texts[i] for i in range(6)] == alone
        assert server.engine.stats["max_batch_seen"] == 4  # the rows decoded together; two requests waited
    finally:
        server.close()


def test_vllm_mapping_and_clear_errors():
    from slmkit.engines import installed, open_model, vllm_sampling

    kwargs = vllm_sampling(SamplingParams(max_new_tokens=7, temperature=0.5, top_k=0, seed=2, ignore_eos=True))
    assert kwargs["max_tokens"] == 7 and kwargs["top_k"] == -1 and kwargs["seed"] == 2 and kwargs["ignore_eos"]
    from slmkit.engines import cuda_available

    # where vLLM cannot run, asking for it says why in one line (with vLLM and a GPU: benchmarks/vllm_check.py)
    missing = "pip install 'slmkit\\[gpu\\]'" if not installed("vllm") else "needs a CUDA GPU"
    if installed("vllm") and cuda_available():
        pytest.skip("vLLM runs here: benchmarks/vllm_check.py verifies it")
    with pytest.raises(SlmError, match=missing):
        open_model(None, "vllm")


def test_slm_export_command(tiny_dir, tmp_path):
    from test_cli import slm

    from slmkit.engines import installed

    r = slm("export", str(tiny_dir), "--quant", "f16", "--out", str(tmp_path / "t.gguf"), "--tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "GGUF (f16" in r.stdout and "parity vs PyTorch" in r.stdout
    report = json.loads((tmp_path / "t.parity.json").read_text())
    assert report["tokens"] == 8 and report["mean_abs_logit_delta"] < 0.05
    r = slm("export", str(tiny_dir), "--to", "onnx", "--out", str(tmp_path / "onnx"))
    if installed("optimum"):  # an environment with optimum's exporter (transformers 4): a real ONNX file
        assert r.returncode == 0 and list((tmp_path / "onnx").glob("*.onnx")), r.stderr
    else:
        assert r.returncode == 1 and "pip install optimum-onnx" in r.stderr
