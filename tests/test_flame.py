"""FLAME data: the formula generator, sketches, checks with openpyxl and `formulas`, evaluation, last-mile
repair corruptions and the formula-aware tokenizer."""

import json
import random
import re

import pytest

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


def test_flame_data_writes_corpus_repairs_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    r = flame.flame_data(tmp_path / "flame", count=300, seed=0, vocab_size=600, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "flame" / "formulas.jsonl").read_text().splitlines()]
    repairs = [json.loads(x) for x in (tmp_path / "flame" / "repair.jsonl").read_text().splitlines()]
    assert len(rows) == r["formulas"] == 300 and 0 < r["test"] < 60 and len(repairs) == r["repairs"]
    assert set(r["kinds"]) == set(flame.CORRUPTIONS) and all(x["fixed"] != x["broken"] for x in repairs)
    tok = AutoTokenizer.from_pretrained(tmp_path / "flame" / "tokenizer")
    formula = "=VLOOKUP(A2,'Q1 Sales'!$A$1:$C$10,3,FALSE)"
    ids = tok(formula).input_ids
    assert tok.decode(ids) == formula
    pieces = tok.convert_ids_to_tokens(ids)
    assert "VLOOKUP(" in pieces and "FALSE" in pieces  # functions and literals are never split across pieces
    assert re.findall(flame.FORMULA_SPLIT, '=SUM(TaxRate)*0.25&"a b"') == ["=", "SUM(", "TaxRate", ")", "*", "0.25",
                                                                         "&", '"a b"']
