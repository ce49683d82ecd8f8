"""EFT / up-scaling on tiny random models (fp32) over the embedded tokenizer: the cached three-model decode
equals a from-scratch recomputation, speculative EFT equals plain EFT, vocabularies and endpoints are checked."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import proof_claims

from slmkit.errors import SlmError
from slmkit.generate import SamplingParams
from slmkit.methods import eft
from slmkit.models import Loaded


def tiny(tokenizer, seed, layers=2, width=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer) + 8, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)  # 8 padding rows beyond the vocabulary
    return Loaded(LlamaForCausalLM(config).eval(), tokenizer, f"tiny-{seed}", None, "causal-lm")


@pytest.fixture(scope="module")
def trio(tokenizer):
    large, ft, base = tiny(tokenizer, 1, 3, 48), tiny(tokenizer, 2), tiny(tokenizer, 3)
    return eft.EFTModels(large, ft, base, eft.shared_vocabulary({m.name: m.tokenizer for m in (large, ft, base)}))


def reference_tokens(models, prompt_ids, n, beta):
    """Greedy EFT with no cache: all three models re-run on the whole sequence every step."""
    ids = list(prompt_ids)
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = [m.model(input_ids=x).logits[0, -1, :models.vocab]
                      for m in (models.large_base, models.small_ft, models.small_base)]
        ids.append(int(eft.combine(*logits, beta).argmax()))
    return ids[len(prompt_ids):]


def test_combine_is_the_eft_formula():
    torch.manual_seed(0)
    large, ft, base = torch.randn(3, 2, 50).unbind(0)
    assert torch.allclose(eft.combine(large, ft, base, 0.0), large.log_softmax(-1), atol=1e-6)
    mixed = eft.combine(large, ft, base, 1.5)
    expected = large.log_softmax(-1) + 1.5 * (ft.log_softmax(-1) - base.log_softmax(-1))
    assert torch.allclose(mixed, expected.log_softmax(-1), atol=1e-5)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(2))


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_cached_batched_eft_equals_recomputation(trio, beta):
    prompts = ["def add(a, b):", "The quick brown fox jumps over the lazy dog and then"]  # different lengths
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    out = eft.eft_generate(trio, prompts, params, beta=beta, chat=False)
    for prompt, completion in zip(prompts, out, strict=True):
        ids = trio.small_ft.tokenizer(prompt).input_ids
        expected = trio.small_ft.tokenizer.decode(reference_tokens(trio, ids, 10, beta), skip_special_tokens=True)
        assert completion.text == expected


def test_speculative_eft_equals_plain_eft(trio):
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    plain = eft.eft_generate(trio, ["import numpy as np"], params, beta=1.0, chat=False)[0].text
    for draft in (1, 3, 6):
        assert eft.eft_generate(trio, ["import numpy as np"], params, beta=1.0, speculative=draft,
                                chat=False)[0].text == plain
    # large base == small base makes EFT(β=1) the small fine-tuned model itself: every draft is accepted
    same = eft.EFTModels(trio.small_base, trio.small_ft, trio.small_base, trio.vocab)
    stats = {}
    from slmkit.generate import generate

    spec = generate(same.small_ft, ["import numpy as np"], params, chat=False,
                    decode=eft.decoder(same, 1.0, speculative=4, stats=stats))[0].text
    alone = generate(same.small_ft, ["import numpy as np"], params, chat=False)[0].text
    assert spec == alone
    assert stats["accepted"] == stats["drafted"] > 0 and stats["rounds"] < 20 // 2


def test_speculative_refuses_what_it_cannot_do_exactly(trio):
    with pytest.raises(SlmError, match="greedy"):
        eft.eft_generate(trio, ["hi"], SamplingParams(temperature=0.7), speculative=2, chat=False)
    with pytest.raises(SlmError, match="one prompt"):
        eft.eft_generate(trio, ["hi", "there"], SamplingParams(), speculative=2, chat=False)


def test_vocabulary_mismatch_and_endpoints_are_refused(tokenizer):
    from slmkit.data.tokenizers import load_tokenizer

    with pytest.raises(SlmError, match="EFT needs one vocabulary: smol .*49152 tokens.* and llama2 .*32000 tokens"):
        eft.shared_vocabulary({"smol": tokenizer, "llama2": load_tokenizer("llama2")})
    with pytest.raises(SlmError, match="endpoint.*full next-token distributions"):
        eft.load_eft("http://127.0.0.1:9/v1#big", "a", "b")


def test_answer_nll_sweep(trio):
    records = [[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}],
               ("Two plus two is", " four.")]
    scores = eft.answer_nll(trio, records, [0.0, 1.0], progress=False)
    assert scores["answer_tokens"] > 4
    assert scores["eft_beta_0"] == pytest.approx(scores["large_base"], rel=1e-5)
    per = scores.pop("per_record")
    assert all(0 < v < 20 for k, v in scores.items() if k != "answer_tokens")
    assert sum(per["tokens"]) == scores["answer_tokens"] and len(per["tokens"]) == 2
    for name in ("large_base", "eft_beta_1"):  # the per-record figures weighted by tokens give the mean
        weighted = sum(t * v for t, v in zip(per["tokens"], per[name], strict=True)) / scores["answer_tokens"]
        assert weighted == pytest.approx(scores[name])


def test_eft_cli_generate_and_eval(trio, tmp_path):
    dirs = []
    for m in (trio.large_base, trio.small_ft, trio.small_base):
        m.model.save_pretrained(tmp_path / m.name)
        m.tokenizer.save_pretrained(tmp_path / m.name)
        dirs.append(str(tmp_path / m.name))

    def slm(*args):
        return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], capture_output=True, text=True,
                              timeout=300)

    r = slm("eft", "Hello", "--large", dirs[0], "--small-ft", dirs[1], "--small-base", dirs[2], "--json",
            "--max-new-tokens", "6", "--ignore-eos", "--dtype", "fp32", "--speculative", "3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] == 6
    r2 = slm("generate", "Hello", "-m", dirs[0], "--eft-ft", dirs[1], "--eft-base", dirs[2], "--json",
             "--max-new-tokens", "6", "--ignore-eos", "--dtype", "fp32")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["text"] == json.loads(r.stdout)["text"]  # speculative or not, same text
    r = slm("eft-eval", "--large", dirs[0], "--small-ft", dirs[1], "--small-base", dirs[2], "--limit", "3",
            "--betas", "0,1", "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "eval" / "eft_eval.json").read_text())
    assert result["held_out"] == 3 and set(result["nll"]) >= {"large_base", "eft_beta_0", "eft_beta_1"}
    assert (tmp_path / "eval" / "eft_beta.png").stat().st_size > 1000
    [c] = proof_claims("eft", tmp_path / "eval" / "eft_eval.json", intervals=True)
    assert c["arms"]["large base"] == result["nll"]["large_base"] and c["lower_is_better"]
    r = slm("eft", "Hello", "--large", "llama2-nope", "--small-ft", dirs[1], "--small-base", dirs[2])
    assert r.returncode == 1 and "Traceback" not in r.stderr
