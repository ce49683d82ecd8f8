"""`slm eval`: perplexity on packaged text (and what int8 quantisation costs), and the lm-eval bridge running
packaged local tasks through lm-eval's own HF model class."""

import json
import math

import pytest

from slmkit.errors import SlmError
from slmkit.evaluate import LOCAL_TASKS, lm_eval_tasks, perplexity


def test_perplexity_separates_a_trained_model_from_a_random_one(smol, tiny_causal):
    trained = perplexity(smol, "brown", tokens=1024, seq_len=256, progress=False)
    random = perplexity(tiny_causal, "brown", tokens=1024, seq_len=256, progress=False)
    assert trained["tokens"] == random["tokens"] > 1000
    assert trained["perplexity"] < 100 < 0.5 * len(smol.tokenizer) < random["perplexity"]
    assert math.isclose(math.log(trained["perplexity"]), trained["nll"])


def test_int8_quantisation_keeps_perplexity():
    import torch

    from slmkit.models import load

    fp32, int8 = load(None, dtype="fp32", progress=False), load(None, dtype="int8", progress=False)
    assert int8.model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    a = perplexity(fp32, "austen", tokens=1024, seq_len=256, progress=False)["perplexity"]
    b = perplexity(int8, "austen", tokens=1024, seq_len=256, progress=False)["perplexity"]
    assert abs(b - a) / a < 0.05, (a, b)


def test_lm_eval_runs_packaged_tasks(tiny_causal):
    pytest.importorskip("lm_eval")
    result = lm_eval_tasks(tiny_causal, list(LOCAL_TASKS), limit=4, batch_size=4)
    assert set(result) == set(LOCAL_TASKS)
    assert 0 <= result["slmkit_spam"]["acc"] <= 1 and 0 <= result["slmkit_arithmetic"]["exact_match"] <= 1
    assert result["slmkit_brown"]["word_perplexity"] > 100  # a random model
    with pytest.raises(SlmError, match="unknown lm-eval task 'no_such_task'"):
        lm_eval_tasks(tiny_causal, ["slmkit_spam", "no_such_task"], limit=2)


def test_slm_eval_command():
    pytest.importorskip("lm_eval")
    from test_cli import slm

    r = slm("eval", "--perplexity", "brown", "--tokens", "512", "--tasks", "slmkit_spam", "--limit", "20", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["perplexity"]["perplexity"] < 100 and result["tasks"]["slmkit_spam"]["sample_len"] == 20
