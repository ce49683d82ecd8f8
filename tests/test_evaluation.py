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
    """lm-eval reads the packaged rows and labels: a model whose next-token distribution is uniform everywhere
    gives every option the log-probability of its length, so on each spam question it picks the option with
    fewer tokens (the first on a tie) and its accuracy is how often that option is the label; its greedy
    answers are never a number."""
    import copy

    import torch

    from slmkit.evaluate import _spam_rows

    pytest.importorskip("lm_eval")
    uniform = copy.copy(tiny_causal)
    uniform.model = copy.deepcopy(tiny_causal.model)
    with torch.no_grad():
        uniform.model.model.norm.weight.zero_()  # the last hidden state is 0: every logit is 0
    result = lm_eval_tasks(uniform, list(LOCAL_TASKS), limit=4, batch_size=4)
    assert set(result) == set(LOCAL_TASKS)
    tok = tiny_causal.tokenizer
    picks = []
    for row in _spam_rows()[:4]:
        context = f"Email: {row['text']}\nQuestion: Is this email spam?\nAnswer:"
        lengths = [len(tok(context + " " + o).input_ids) for o in ("no", "yes")]
        picks.append(int(lengths[1] < lengths[0]) == row["label"])
    assert result["slmkit_spam"]["acc"] == sum(picks) / 4
    assert result["slmkit_arithmetic"]["exact_match"] == 0.0
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
