"""Shared fixtures: the embedded model is loaded once per session; tiny random models are built per test
from zoo-style configs with the embedded model's real tokenizer."""

import os

import pytest

# No test may reach outside this machine: point hub look-ups at a closed loopback port.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture(scope="session")
def smol():
    from slmkit.models import load

    return load(None, progress=False)


@pytest.fixture(scope="session")
def tokenizer(smol):
    return smol.tokenizer


def tiny_llama(tokenizer, context: int = 128, name: str = "tiny-llama"):
    """A 2-layer random Llama over the embedded tokenizer's vocabulary, fp32, with `context` positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.models import Loaded

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return Loaded(LlamaForCausalLM(config).eval(), tokenizer, name, None, "causal-lm")


def at_once(work, n: int) -> tuple[dict, list]:
    """Run work(i) for i < n in n threads at once: ({i: result}, [exceptions])."""
    import threading

    results, errors = {}, []

    def one(i):
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def saved(loaded, directory):
    """A model and its tokenizer saved as a Hugging Face directory; returns the directory."""
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_causal(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_seq2seq(tokenizer):
    """A 2+2-layer random T5 v1.1 over the embedded tokenizer's vocabulary, fp32."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from slmkit.models import Loaded

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = T5ForConditionalGeneration(config).eval()
    return Loaded(model, tokenizer, "tiny-t5", None, "seq2seq")


# What the test install brings. Under CI a missing one fails the run at once, instead of its tests being
# skipped in silence (outside CI they skip, with their reason, so a partial install can still test the rest).
REQUIRED_COMMANDS = ("bwrap", "gcc", "aarch64-linux-gnu-gcc")
REQUIRED_MODULES = ("llama_cpp", "lm_eval", "bitsandbytes", "tensorboard", "openai", "onnxruntime")


def pytest_sessionstart(session):
    import importlib.util
    import shutil

    if not os.environ.get("CI"):
        return
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    missing += [f"python module {m}" for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(f"CI needs every tool the tests use; missing: {', '.join(missing)} "
                                "(install as the README's second command does)")


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from Debian's packages, driven through Debian's chromedriver (nothing is downloaded).
    The README's test command installs both; a missing one fails the tests that use it."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the web tests need Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def proof_claims(key: str, path, intervals: bool | None = None) -> list[dict]:
    """The claims the proofs page reads from a result file a workflow wrote (slmkit.proofs): each with its arms,
    a verdict and, where the file keeps each item's (or seed's) outcome, an interval of better - baseline that
    holds the observed difference. `intervals=True` requires every claim to have one, False none."""
    import json
    from pathlib import Path

    from slmkit.proofs import PROOFS

    proof = next(p for p in PROOFS if p.key == key)
    claims = proof.claims(json.loads(Path(path).read_text()), Path(path))
    assert claims
    for c in claims:
        assert set(c["arms"]) == {c["better"], c["baseline"]} and c["holds"] in (True, False, None)
        if intervals is not None:
            assert (c["difference_interval"] is not None) == intervals, c
        if c["difference_interval"]:
            low, high = c["difference_interval"]
            assert low - 1e-9 <= c["arms"][c["better"]] - c["arms"][c["baseline"]] <= high + 1e-9, c
    return claims
