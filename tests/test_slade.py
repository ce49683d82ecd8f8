"""SLaDe: the C generator compiled with the real gcc, assembly normalisation, the IO harness run in the
sandbox, compiler-driven type inference, the corpus and tokenizer, and one train -> eval -> decompile path
on a tiny model."""

import itertools
import json
import random
import re
import shutil

import pytest
from conftest import proof_claims

from slmkit.domains import slade
from slmkit.errors import SlmError
from slmkit.sandbox import Limits, Sandbox, bwrap_command

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(2, Limits(timeout=2.0), unsandboxed=bwrap_command() is None) as sb:
        yield sb


@pytest.fixture(scope="module")
def programs():
    rng = random.Random(0)
    return [slade.random_program(rng, f"fn_{i}") for i in range(60)]


def test_generator_is_deterministic_varied_and_every_target_compiles_alone(programs):
    again = [slade.random_program(random.Random(0), "fn_0")]
    assert again[0].target == programs[0].target
    text = "\n".join(p.target for p in programs)
    for construct in ("for (int i = 0;", "while (", "if (", "typedef struct", "->", "unsigned", "long", "%", "<<"):
        assert construct in text, construct
    assert len({p.target for p in programs}) == len(programs)
    for p in programs[:25]:
        assert slade.compile_errors(p.target) == [], p.target  # the declarations it carries are enough
        used = set(re.findall(r"\w+", p.function))
        if p.context.struct and p.context.struct[0] in used:
            assert "typedef struct" in p.target


def test_normalised_assembly_of_both_levels(programs):
    p = next(p for p in programs if "for (" in p.function)
    o0, o3 = slade.asm_of(p, "O0"), slade.asm_of(p, "O3")
    for asm in (o0, o3):
        lines = asm.splitlines()
        assert lines[0] == f"{p.name}:" and "ret" in lines
        assert not any(ln.startswith(".") and not re.fullmatch(r"\.L\w+:|\.(long|quad|value|byte) .*", ln)
                       for ln in lines), asm  # no directives left
        labels = list(dict.fromkeys(re.findall(r"\.L\d+", asm)))
        assert labels == [f".L{i}" for i in range(len(labels))]  # renumbered in order
    assert "%rbp" in o0 and o0 != o3
    with pytest.raises(SlmError, match="not found in the assembly"):
        slade.normalise_asm(slade.compile_asm(p.source, "O0"), "no_such_function")


def test_io_harness_accepts_the_original_and_rejects_a_changed_function(programs, sandbox):
    for p in programs[:6]:
        h = slade.harness(p)
        assert slade.io_check(sandbox, h, p.target, p.target) == {"builds": True, "io": True, "error": ""}
    p = next(p for p in programs if "return" in p.function)
    wrong = p.target.replace("return ", "return 1 + ", 1)
    assert slade.io_check(sandbox, slade.harness(p), p.target, wrong)["io"] is False
    broken = slade.io_check(sandbox, slade.harness(p), p.target, p.target.replace("{", "", 1))
    assert broken["builds"] is False and "error" in broken["error"]
    crash = p.target.replace("{\n", "{\n    *(volatile int *)0 = 1;\n", 1)
    assert slade.io_check(sandbox, slade.harness(p), p.target, crash)["error"] == "killed by SIGSEGV"
    checks = slade.io_checks(sandbox, slade.harness(p), p.target, [wrong, p.target, crash], until_pass=True)
    assert [c["io"] for c in checks] == [False, True]  # stops at the first that passes


def test_type_inference_declares_what_gcc_finds_missing(sandbox):
    pred = ("long mix(point *p, int k)\n{\n    p->x = lut[k & 7] + scale;\n    return clamp(p->y, 0, 9) + p->x;\n}\n")
    completed, added, ok = slade.infer_declarations(pred)
    assert ok and slade.compile_errors(completed) == []
    assert "typedef struct { int x; int y; } point;" in added
    assert {"extern int lut[];", "extern int scale;", "int clamp();"} <= set(added)
    assert slade.infer_declarations("int f(int a)\n{\n    return a;\n}\n") == (
        "int f(int a)\n{\n    return a;\n}\n", [], True)
    assert slade.defines(completed, "mix") and not slade.defines("int mix(int);", "mix")
    # a declaration recovered by inference is enough for the IO test when the layout matches
    rng = random.Random(4)
    p = next(q for q in (slade.random_program(rng, f"g{i}") for i in range(200))
             if q.context.global_array and q.context.global_array in q.function)
    completed, added, ok = slade.infer_declarations(p.function)
    assert ok and any(p.context.global_array in a for a in added)
    assert slade.io_check(sandbox, slade.harness(p), p.target, completed)["io"]


def test_slade_data_corpus_tokenizer_and_user_c_file(tmp_path):
    from transformers import AutoTokenizer

    user = tmp_path / "mine.c"
    user.write_text("#include <stdio.h>\nint bias = 3;\nint add_bias(int x)\n{\n    return x + bias;\n}\n")
    r = slade.slade_data(tmp_path / "slade", count=60, seed=1, test_fraction=0.2, vocab_size=800,
                         c_files=[user], progress=False)
    rows = [json.loads(x) for x in (tmp_path / "slade" / "pairs.jsonl").read_text().splitlines()]
    assert r["functions"] == 60 and r["test"]["x86_64 -O0"] == r["test"]["x86_64 -O3"] > 0
    assert {x["level"] for x in rows} == {"O0", "O3"} and all("harness" in x for x in rows if x["split"] == "test")
    assert any(x["function"] == "add_bias" and "add_bias:" in x["asm"] for x in rows)
    tasks = [json.loads(x) for x in (tmp_path / "slade" / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == r["train_pairs"] > 60
    tok = AutoTokenizer.from_pretrained(tmp_path / "slade" / "tokenizer")
    asm = rows[0]["asm"]
    assert tok.decode(tok(asm).input_ids, skip_special_tokens=True) == asm
    assert len(tok(asm).input_ids) < len(asm.splitlines()) * 4  # whole instructions are learned as pieces
    again = slade.slade_data(tmp_path / "again", count=60, seed=1, test_fraction=0.2, vocab_size=800,
                             number_pieces=True, progress=False)
    assert (tmp_path / "again" / "tasks.jsonl").read_text().count("\n") == again["train_pairs"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "again" / "tokenizer")  # constants are tokens of their own
    text = "".join(x["asm"] + x["c"] for x in rows[:20])
    ends = list(itertools.accumulate(len(tok.decode([i])) for i in tok(text).input_ids))
    numbers = [m.span() for m in re.finditer(slade.corpus._NUMBER, text)]
    assert len(numbers) > 20 and all(a in [0] + ends and b in ends for a, b in numbers)
    with pytest.raises(SlmError, match="not found"):
        slade.user_pairs(tmp_path / "missing.c")


def test_train_eval_and_decompile_end_to_end(tmp_path):
    """Mechanics on a tiny T5: training lowers the loss; eval reports every metric per level; decompile reads
    a gcc -S file. (The nano model's IO accuracy is the README's measured figure.)"""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from slmkit.methods.finetune import FinetuneArgs
    from slmkit.models import save_pretrained_atomic

    data = tmp_path / "slade"
    slade.slade_data(data, count=80, seed=2, test_fraction=0.1, vocab_size=700, progress=False)
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    config = T5Config(vocab_size=len(tok), d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2,
                      d_kv=32, decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    save_pretrained_atomic(T5ForConditionalGeneration(config), tok, tmp_path / "tiny")
    args = FinetuneArgs(steps=30, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=3, eval_every=30,
                        save_every=30, log_every=10)
    s = slade.slade_train(data, str(tmp_path / "tiny"), "s", tmp_path / "runs", train_args=args, progress=False)
    assert s["val_loss"] < s["val_loss_before"]
    model = tmp_path / "runs" / "s" / "train" / "model"
    r = slade.slade_eval(str(model), data, limit=3, max_new_tokens=24, candidates=3, out=tmp_path / "eval.json",
                         unsandboxed=bwrap_command() is None, progress=False)
    assert list(r["levels"]) == ["x86_64 -O0", "x86_64 -O3"] and r["candidates"] == 3
    claims = proof_claims("slade", tmp_path / "eval.json", intervals=True)
    assert [c["arms"]["model"] for c in claims] == [m["io_accuracy"] for m in r["levels"].values()]
    for m in r["levels"].values():
        examples = m["examples"]  # all three functions: the figures are what the examples show
        assert m["functions"] == len(examples) == 3
        assert m["io_accuracy"] == sum(e["io"] for e in examples) / 3
        assert all(e["builds"] for e in examples if e["io"])  # a prediction passes its IO tests only once built
        assert m["io_accuracy_greedy"] <= m["io_accuracy_any"] and m["io_accuracy"] <= m["io_accuracy_any"]
        assert m["io_accuracy"] <= m["compile_rate"]
        assert m["edit_similarity"] == pytest.approx(
            sum(slade.edit_similarity(e["prediction"], e["original"]) for e in examples) / 3)
    assert json.loads((tmp_path / "eval.json").read_text())["levels"].keys() == r["levels"].keys()
    source = tmp_path / "f.c"
    source.write_text("int twice(int x)\n{\n    return 2 * x;\n}\n")
    (tmp_path / "f.s").write_text(slade.compile_asm(source.read_text(), "O3"))
    raw = slade.decompile(tmp_path / "f.s", str(model), max_new_tokens=24, candidates=1, infer=False)
    out = slade.decompile(tmp_path / "f.s", str(model), max_new_tokens=24, candidates=1)
    # type inference only adds declarations above the model's C (the function found by its .globl label)
    assert raw.strip() and out.endswith(raw) and all(line.strip() for line in out[:-len(raw)].splitlines())
    with pytest.raises(SlmError, match="not found"):
        slade.decompile(tmp_path / "nope.s", str(model))


@pytest.mark.parametrize("level", ["O0", "O3"])
def test_divisions_by_constants_are_marked_with_their_divisor(level):
    source = ("int f(int a, int b)\n{\n    return a / 9 + b % 7;\n}\n"
              "unsigned g(unsigned a)\n{\n    return a / 10;\n}\n"
              "long h(long a)\n{\n    return a / 9;\n}\n"
              "int k(int a)\n{\n    return a * 123456789 + a / 4;\n}\n")
    asm = slade.compile_asm(source, level)
    marks = {name: re.findall(r"# div (\d+)", slade.normalise_asm(asm, name)) for name in "fghk"}
    assert sorted(marks["f"]) == ["7", "9"]
    assert marks["g"] == ["5"]  # 2^35/10 is 2^34/5: the odd divisor; the shift that follows holds the 2
    assert marks["h"] == ["9"]  # a 64-bit magic number
    assert marks["k"] == []  # an ordinary constant, and a division by a power of two (a shift)
    assert slade.divisor_of(954437177) == 9 and slade.divisor_of(-1840700269) == 7
    assert slade.divisor_of(123456789) is None and slade.divisor_of(1_000_000) is None


def test_every_division_by_a_constant_up_to_1100_is_marked_with_its_odd_divisor():
    """What docs/slade.md says: gcc's magic numbers for dividing by every constant 2..1,100, in 32- and 64-bit,
    signed and unsigned, are marked with the odd divisor - but for unsigned divisions by 224, 448 and 896."""
    kinds = {"i": "int", "u": "unsigned", "l": "long", "ul": "unsigned long"}
    source = "".join(f"{t} f_{k}_{d}({t} a)\n{{\n    return a / {d};\n}}\n" for d in range(2, 1101)
                     for k, t in kinds.items())
    asm = slade.compile_asm(source, "O0")
    chunks = re.split(r"^(?=f_\w+:$)", asm, flags=re.M)  # one piece per function: normalising each is quick
    marks = {}
    for chunk in chunks[1:]:
        name = chunk.split(":", 1)[0]
        marks[name] = re.findall(r"# div (\d+)", slade.normalise_asm(chunk, name))
    assert len(marks) == 4 * 1099
    missed = []
    for d in range(2, 1101):
        odd = d >> (d & -d).bit_length() - 1  # the divisor without its factors of two
        for k in kinds:
            if marks[f"f_{k}_{d}"] != ([str(odd)] if odd > 1 else []):
                missed.append((k, d, marks[f"f_{k}_{d}"]))
    assert [(k, d) for k, d, _ in missed] == [(k, d) for d in (224, 448, 896) for k in ("u", "ul")], missed


def test_choose_keeps_the_candidate_gcc_compiles_back_nearest_the_input():
    asm = slade.normalise_asm(slade.compile_asm("int twice(int x)\n{\n    return 2 * x;\n}\n", "O3"), "twice")
    plus = "int f(int x)\n{\n    return x + 1;\n}\n"
    times = "int f(int x)\n{\n    return x * 2;\n}\n"
    broken = "int f(int x)\n{\n    return x +;\n}\n"
    assert slade.recompiled_similarity(slade.restore_name(times, "twice"), "twice", asm, ["O3"]) == 1.0
    assert 0 < slade.recompiled_similarity(slade.restore_name(plus, "twice"), "twice", asm, ["O3"]) < 1
    assert slade.recompiled_similarity(broken, "twice", asm, ["O0", "O3"]) == 0.0
    pick = slade.choose([plus, broken, times, plus], "twice", asm, ["O3"])
    assert pick["index"] == 2 and pick["compiles"] and pick["score"] == 1.0
    assert "twice(int x)" in pick["source"] and pick["prediction"] == slade.restore_name(times, "twice")
    assert slade.choose([broken, plus], "twice", asm, ["O3"])["index"] == 1  # what compiles beats what does not
    assert slade.choose([times, times.replace("x * 2", "x + x")], "twice", asm, ["O3"])["index"] == 0  # a tie
    # a global the assembly never names: gcc folds `g * 0` away, so it compiles back to the input exactly, but
    # the function it reads is not the one compiled, and what compiles without one wins
    ghost = "extern int g;\nint f(int x)\n{\n    return x * 2 + g * 0;\n}\n"
    assert slade.recompiled_similarity(slade.restore_name(ghost, "twice"), "twice", asm, ["O3"]) == 1.0
    pick = slade.choose([ghost, plus], "twice", asm, ["O3"])
    assert pick["index"] == 1 and len(pick["compiling"]) == 2
    assert slade.foreign_globals("extern int tbl[16];\nextern long g;\n", "movl tbl(%rip), %eax") == ["g"]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
def test_aarch64_assembly(programs, tmp_path):
    p = next(p for p in programs if "for (" in p.function)
    asm = slade.asm_of(p, "O3", "aarch64")
    assert asm.startswith(f"{p.name}:\n") and "ret" in asm.split() and "%rbp" not in asm
    assert "#" in asm or "ldr" in asm  # ARM immediates keep their '#', comments ('//') are gone
    assert "//" not in asm and not re.search(r"^\s*\.(cfi|p2align|type)", asm, flags=re.M)
    r = slade.slade_data(tmp_path / "arm", count=12, seed=3, vocab_size=600, arches=["x86_64", "aarch64"],
                         progress=False)
    rows = [json.loads(x) for x in (tmp_path / "arm" / "pairs.jsonl").read_text().splitlines()]
    assert {(x["arch"], x["level"]) for x in rows} == {(a, lv) for a in slade.ARCHES for lv in slade.LEVELS}
    assert r["pairs"] == 48
    with pytest.raises(SlmError, match="unknown architecture"):
        slade.compile_asm(p.source, "O0", "riscv")
