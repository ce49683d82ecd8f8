"""UL2R: span corruption, prefix-LM masks, and a short continued-training run on a tiny model."""

import json

import numpy as np
import pytest
import torch
from conftest import proof_claims

from slmkit.errors import SlmError
from slmkit.methods import ul2r as u


def test_span_mask_rate_and_spans():
    rng = np.random.default_rng(0)
    for rate, mean in [(0.15, 3), (0.5, 3), (0.15, 32)]:
        mask = u.span_mask(256, rate, mean, rng)
        assert mask.sum() == round(256 * rate)
        starts = int((mask[1:] & ~mask[:-1]).sum() + mask[0])
        assert abs(starts - round(256 * rate / mean)) <= 1
        assert not mask[0]  # T5's layout starts with an uncorrupted gap


def test_examples_reconstruct_the_window():
    rng = np.random.default_rng(1)
    ids = list(range(100, 160))
    sentinels = list(range(900, 964))
    inputs, targets = u.make_example(ids, u.Denoiser("R", 3, 0.15, 1), 1, sentinels, 2, rng)
    assert inputs[0] == 1 and targets[-1] == 2
    # filling every sentinel in the input with its target span gives the window back
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    rebuilt = [x for t in inputs[1:] for x in (spans[t] if t in sentinels else [t])]
    assert rebuilt == ids
    inputs, targets = u.make_example(ids, u.Denoiser("S", 0, 0, 1), 3, sentinels, 2, rng)
    assert inputs[0] == 3 and inputs[1:] + targets[:-1] == ids


def test_prefix_lm_mask_is_bidirectional_over_the_input_only():
    b = u.prefix_lm_batch([([1, 5, 6], [7, 8, 2]), ([1, 9], [2])], 0, torch.float32)
    allowed = b["attention_mask"][:, 0] == 0
    assert allowed[0, :3, :3].all()  # the input sees itself both ways
    assert not allowed[0, :3, 3:].any()  # ...and never the target
    assert allowed[0, 4, :5].all() and not allowed[0, 4, 5]  # the target is causal
    assert b["labels"][0].tolist() == [-100, -100, -100, 7, 8, 2]
    assert b["labels"][1].tolist() == [-100, -100, 2, -100, -100, -100]


def test_bad_denoiser_specs():
    for spec, message in [("Q:3:0.1:1", "kind must be R, X or S"), ("R:3:1.5:1", "0 < rate < 1"),
                          ("R:3", "expected KIND:MEAN_SPAN:RATE:WEIGHT"), ("R:3:0.15:0", "weight")]:
        with pytest.raises(SlmError, match=message):
            u.parse_denoisers(spec)


def test_ul2r_continued_training_learns_to_infill(tiny_causal, tmp_path):
    """A few steps on the Python docs: sentinels and modes are added, infilling loss falls, the run records
    the compute fraction from --pretrain-tokens."""
    import copy

    from slmkit.train import TrainArgs

    model_dir = tmp_path / "tiny"
    copy.deepcopy(tiny_causal.model).save_pretrained(model_dir)
    tiny_causal.tokenizer.save_pretrained(model_dir)
    r = u.ul2r(str(model_dir), data="python-docs", pretrain_tokens=1_000_000, eval_windows=8, run="u",
               runs_dir=tmp_path, train_args=TrainArgs(steps=30, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=3,
                                                       eval_every=0, save_every=0, log_every=10, eval_batches=2),
               progress=False)
    assert r["after"]["infilling_loss"] < r["before"]["infilling_loss"] - 0.5
    assert r["after"]["infilling_text_loss"] < r["before"]["infilling_text_loss"]
    assert r["extra_compute"] == pytest.approx(30 * 4 * 64 / 1_000_000)
    assert "l2r_ppl_change" in r
    saved = json.loads((tmp_path / "u" / "ul2r.json").read_text())
    assert saved["steps"] == 30
    [c] = proof_claims("ul2r", tmp_path / "u" / "ul2r.json", intervals=True)
    assert c["arms"] == {"after": r["after"]["infilling_loss"], "before": r["before"]["infilling_loss"]}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "u" / "model")
    assert "[NLU]" in tok.get_vocab() and "<extra_id_63>" in tok.get_vocab()


def test_ul2r_span_corruption_for_t5(tiny_seq2seq):
    import copy

    model = copy.deepcopy(tiny_seq2seq.model)
    tok = copy.deepcopy(tiny_seq2seq.tokenizer)
    objective = u.UL2Objective(tok, model, u.parse_denoisers("R:3:0.15:1"))
    windows = torch.randint(100, 1000, (2, 40))
    loss, n = objective(model, windows, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and n > 4
    assert model.get_input_embeddings().num_embeddings >= len(tok)
