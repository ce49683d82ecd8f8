"""FLAME data: the formula generator, sketches, checks with openpyxl and `formulas`, evaluation, last-mile
repair corruptions and the formula-aware tokenizer."""

import json
import random
import re
from dataclasses import replace

import pytest
from conftest import proof_claims

from slmkit.domains import flame
from slmkit.errors import SlmError


@pytest.fixture(scope="module")
def corpus():
    return flame.formula_corpus(600, seed=0)


def test_corpus_is_deterministic_valid_and_one_formula_per_sketch(corpus):
    assert corpus == flame.formula_corpus(600, seed=0) and corpus != flame.formula_corpus(600, seed=1)
    assert all(flame.check_formula(f) is None for f in corpus)
    assert len({flame.sketch(f) for f in corpus}) == len(corpus)
    functions = {m for f in corpus for m in re.findall(r"([A-Z][A-Z0-9.]*)\(", f)}
    assert {"SUM", "IF", "VLOOKUP", "INDEX", "MATCH", "LEFT", "CONCATENATE", "DATE", "SUMIF", "AND"} <= functions
    text = "".join(corpus)
    assert "$" in text and "!" in text and "'Q1 Sales'!" in text and '"' in text and "TaxRate" in text or \
        any(name in text for name in flame.NAMES)
    assert sum(f.count("(") > 1 for f in corpus) > len(corpus) / 3  # nesting is common


def test_sketch_check_and_evaluate():
    assert flame.sketch('=SUMIF(Data!$A$1:$A$9,">5",B1:B9)*0.5') == "=SUMIF(R,S,R)*N"
    assert flame.check_formula("=SUM(A1:A3") is not None
    assert flame.check_formula("=SUMM(A1:A3)").startswith("unknown function")
    assert flame.check_formula("SUM(A1)") == "does not start with ="
    assert flame.evaluate("=SUM(A1:A3)*2+IF(B1>3,10,1)", {"A1:A3": [[1], [2], [3]], "B1": 5}) == 22
    assert flame.evaluate('=UPPER(LEFT(A1,3))&"-"&B2', {"A1": "hello", "B2": 7}) == "HEL-7"
    assert flame.equivalent("=SUM(A1:A3)*2+Data!B2", "=2*SUM(A1:A3)+Data!B2")
    assert flame.equivalent("=A1-B1", "=B1-A1") is False and flame.equivalent("=SUMM(A1)", "=SUM(A1)") is False
    sheet = flame.random_sheet("=SUM(A1:B3)+TaxRate+C4", random.Random(0))
    assert len(sheet["A1:B3"]) == 3 and len(sheet["A1:B3"][0]) == 2 and {"TAXRATE", "C4"} <= set(sheet)


def test_corruptions_break_what_they_claim(corpus):
    rng = random.Random(0)
    fails_check = {"missing-paren", "extra-paren", "misspelled-function"}
    for kind in flame.CORRUPTIONS:
        made = 0
        for f in corpus[:200]:
            out = flame.corrupt(f, rng, kind)
            if out is None:
                continue
            made += 1
            assert out[0] == kind and out[1] != f
            if kind in fails_check:
                assert flame.check_formula(out[1]) is not None, (kind, out[1])
        assert made >= 20, kind
    assert flame.corrupt('=SUM(A1,B2)', random.Random(1), "swapped-arguments") == ("swapped-arguments", "=SUM(B2,A1)")
    with pytest.raises(SlmError, match="unknown corruption"):
        flame.corrupt("=SUM(A1)", rng, "typo")


def test_pretraining_objectives_damage_the_formula_and_keep_it_as_the_target(corpus):
    rng = random.Random(2)
    for f in corpus[:200]:
        tail = flame.tail_mask(f, rng)
        assert tail.endswith(flame.MASK) and f.startswith(tail[:-len(flame.MASK)]) and len(tail) > 1
        spans = flame.span_mask(f, rng)  # masks replace whole pieces: what is left is the formula's own pieces
        kept = [x for x in re.split(re.escape(flame.MASK), spans) if x]
        assert 1 <= spans.count(flame.MASK) <= 3 and all(k in f for k in kept)
        assert flame.MASK + flame.MASK not in spans
        noisy = flame.random_noise(f, rng)
        assert noisy != f and noisy.startswith("=") and set(noisy) <= set(f)  # made of the formula's own pieces
        pair = flame.pretrain_pair(f, rng)
        if pair:
            assert pair["completion"] == f and pair["prompt"] != f and pair["objective"] in flame.PRETRAIN_OBJECTIVES
    counts = {name: 0 for name in flame.PRETRAIN_OBJECTIVES}
    for f in corpus:
        if pair := flame.pretrain_pair(f, rng):
            counts[pair["objective"]] += 1
    assert all(n > 60 for n in counts.values()), counts  # every objective is sampled (weights 0.2-0.35)


def test_flame_data_writes_corpus_repairs_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    r = flame.flame_data(tmp_path / "flame", count=300, seed=0, vocab_size=600, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "flame" / "formulas.jsonl").read_text().splitlines()]
    repairs = [json.loads(x) for x in (tmp_path / "flame" / "repair.jsonl").read_text().splitlines()]
    assert len(rows) == r["formulas"] == 300 and 0 < r["test"] < 60 and len(repairs) == r["repairs"]
    assert set(r["kinds"]) == set(flame.CORRUPTIONS) and all(x["fixed"] != x["broken"] for x in repairs)
    pretrain = [json.loads(x) for x in (tmp_path / "flame" / "pretrain.jsonl").read_text().splitlines()]
    train = {x["formula"] for x in rows if x["split"] == "train"}
    assert len(pretrain) > 2 * len(train) and {x["completion"] for x in pretrain} <= train
    tok = AutoTokenizer.from_pretrained(tmp_path / "flame" / "tokenizer")
    formula = "=VLOOKUP(A2,'Q1 Sales'!$A$1:$C$10,3,FALSE)"
    ids = tok(formula).input_ids
    assert tok.decode(ids) == formula
    pieces = tok.convert_ids_to_tokens(ids)
    assert "VLOOKUP(" in pieces and "FALSE" in pieces  # functions and booleans are never split
    assert re.findall(flame.FORMULA_SPLIT, "=SUM(TaxRate)*0.25&Data!$B$17") == [
        "=", "SUM(", "TaxRate", ")", "*", "0", ".", "25", "&", "Data!", "$", "B", "$", "17"]  # copyable refs
    assert re.findall(flame.FORMULA_PIECES, '=SUM(TaxRate)*0.25&"a b"') == ["=", "SUM(", "TaxRate", ")", "*", "0.25",
                                                                          "&", '"a b"']


def test_normalise_and_completion_prefix():
    assert flame.normalise('= sum(a1, b2) & " x y"') == '=SUM(A1,B2)&" x y"'
    prefix = flame.completion_prefix("=VLOOKUP(A2,$B$1:$D$9,3,FALSE)", random.Random(0))
    assert prefix.startswith("=VLOOKUP(") and len(prefix) < len("=VLOOKUP(A2,$B$1:$D$9,3,FALSE)")


def test_flame_train_eval_and_commands_end_to_end(tmp_path):
    """Data, pretraining of flame-nano on FLAME's objectives, repair/completion fine-tuning (a few steps: mechanics,
    not quality), evaluation with the copy baseline, and the repair / search commands."""
    from typer.testing import CliRunner

    from slmkit.cli import app
    from slmkit.methods.finetune import FinetuneArgs

    data = tmp_path / "flame"
    flame.flame_data(data, count=300, seed=0, vocab_size=600, progress=False)
    args = FinetuneArgs(steps=8, batch_size=8, seq_len=64, lr=2e-3, warmup_steps=1, eval_every=0, save_every=0,
                        log_every=2, eval_batches=2)
    s = flame.flame_train(data, "flame-nano", pretrain_steps=6, run="f", runs_dir=tmp_path, train_args=args,
                          progress=False)
    assert s["pretrain"]["val_loss"] < 8 and s["tune"]["val_loss"] < s["tune"]["val_loss_before"]
    model = tmp_path / "f" / "tune" / "model"
    r = flame.flame_eval(str(model), data, limit=8, out=tmp_path / "eval.json")
    assert r["repairs"] == 8 and sum(k["count"] for k in r["per_kind"].values()) == 8
    [c] = proof_claims("flame", tmp_path / "eval.json", intervals=True)
    assert c["arms"] == {"model": r["repair_exact"], "copy the input": r["copy_exact"]}
    assert r["copy_exact"] == 0 and len(r["examples"]) == 8  # every test pair is broken; the examples are all 8
    right = [flame.normalise(e["model"]) == flame.normalise(e["fixed"]) for e in r["examples"]]
    assert r["repair_exact"] == sum(right) / 8  # the figure is what the examples show, and per kind adds up to it
    assert sum(k["model"] * k["count"] for k in r["per_kind"].values()) == pytest.approx(sum(right))
    assert 0 < r["repair_token_accuracy"] < 1
    assert r["retrieval_at_1"] <= r["retrieval_at_5"] and r["collection"] > r["completions"]
    assert json.loads((tmp_path / "eval.json").read_text())["repairs"] == 8
    result = CliRunner().invoke(app, ["flame", "repair", "=SUM(A1:A3", "--model", str(model)])
    assert result.exit_code == 0 and "=SUM(A1:A3  ->" in result.output, result.output
    hits = flame.search("=VLOOKUP(", str(model), data, top=3)
    assert len(hits) == 3 and hits[0][0] >= hits[1][0] >= hits[2][0]
    fresh = flame.flame_train(data, "flame-nano", pretrain_steps=0, run="f0", runs_dir=tmp_path,  # built fresh
                              train_args=replace(args, steps=2), retrieval_weight=1.0, progress=False)
    assert "pretrain" not in fresh and (tmp_path / "f0" / "init" / "tokenizer.json").is_file()
    with pytest.raises(SlmError, match="slm flame data"):
        flame.flame_train(tmp_path / "missing", run="x", runs_dir=tmp_path, train_args=args, progress=False)
    (data / "pretrain.jsonl").write_text('{"text": "=SUM(A1:A3)"}\n')  # the format before FLAME's objectives
    with pytest.raises(SlmError, match="older `slm flame data`"):
        flame.flame_train(data, run="old", runs_dir=tmp_path, train_args=args, progress=False)


def test_retrieval_term_teaches_the_encoder_to_find_each_target():
    """On one batch of random input/target pairs (inputs behind a task prompt), the term teaches the pooled
    encoder states of each input - embedded without its prompt, as `search` embeds a query - to rank the input's
    own target first; held out (eval mode) the objective is the model's seq2seq loss, and a target that appears
    twice in the batch is no negative for itself (the loss stays finite)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=1,
                                                num_heads=2, d_kv=16, decoder_start_token_id=0, pad_token_id=0))
    ids, labels = torch.randint(2, 64, (8, 10)), torch.randint(2, 64, (8, 6))
    labels[:, 4:] = -100
    labels[7] = labels[6]
    prompt = [1, 1, 1]
    batch = {"input_ids": torch.cat([torch.tensor([prompt] * 8), ids], 1), "labels": labels}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])

    def ranked_first() -> int:
        with torch.no_grad():
            encoder, keep = model.get_encoder(), labels != -100
            q = flame.pooled(encoder(input_ids=ids).last_hidden_state, torch.ones_like(ids))
            d = flame.pooled(encoder(input_ids=labels.clamp(min=0), attention_mask=keep.long()).last_hidden_state, keep)
        return int(((q @ d.T).argmax(-1)[:6] == torch.arange(6)).sum())

    objective = flame.retrieval_objective(1.0, [prompt])
    model.eval()
    assert torch.isclose(objective(model, batch, None)[0], model(**batch).loss)
    start = ranked_first()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss, _ = objective(model, batch, None)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ranked_first() == 6 > start
