"""The `slm` command as a user runs it: a real subprocess, real model, real stdin/stdout."""

import json
import subprocess
import sys
import time

import pytest


def slm(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_help_is_fast_and_lists_commands():
    t0 = time.perf_counter()
    r = slm("--help")
    assert r.returncode == 0
    for command in ("quickstart", "zoo", "generate", "chat"):
        assert command in r.stdout
    assert time.perf_counter() - t0 < 10  # no torch import for --help
    r = subprocess.run([sys.executable, "-c", "import slmkit.cli, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False"


def test_generate_default_model_answers_paris(smol):
    r = slm("generate", "The capital of France is", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Traceback" not in r.stderr


def test_generate_jsonl_batch_and_errors(tmp_path, smol):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n\n'
                       '{"messages": [{"role": "user", "content": "Say hi."}]}\n')
    # the torch engine: llama.cpp's 8-bit activations make greedy answers depend on the CPU's kernels
    r = slm("generate", "--input", str(prompts), "--json", "--max-new-tokens", "12", "--stop", "\n",
            "--engine", "torch")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(row["completion_tokens"] <= 12 and "\n" not in row["text"] for row in rows)
    assert "Paris" in rows[0]["text"]

    prompts.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    r = slm("generate", "--input", str(prompts))
    assert r.returncode == 1 and f"{prompts}:2: invalid JSON" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "hi", "-m", "tinylama"], "did you mean tinyllama"),
    (["generate", "hi", "-m", "/no/such/model.gguf"], "model path not found"),
    (["generate", "hi", "-m", "roberta-nano"], "masked-lm model"),
    (["zoo", "phi-3"], "unknown model 'phi-3'"),
])
def test_bad_input_one_line_error(args, message):
    r = slm(*args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, even for long paths


def test_generate_reads_stdin(smol):
    r = slm("generate", "--no-chat", "--max-new-tokens", "5", stdin="The capital of France is")
    assert r.returncode == 0 and "Paris" in r.stdout


def test_chat_through_a_pipe_with_reset(smol):
    r = slm("chat", "--max-new-tokens", "16", "--engine", "torch",
            stdin="What is the capital of France?\n/reset\nSay hello.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "history cleared" in r.stderr
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 2


def test_zoo_table_and_init(tmp_path):
    r = slm("zoo", "--json")
    assert r.returncode == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["tinyllama-1.1b"]["params"] == 1100048384 and rows["phi-nano"]["nano"]
    r = slm("zoo")
    for name in ("tinyllama-1.1b", "litellama-460m", "phi-2", "roberta-large", "flan-t5-large", "flame-60m",
                 "slade-200m", "llava-phi-3b", "smollm2-135m"):
        assert name in r.stdout
    assert "1.1B" in r.stdout and "2.78B" in r.stdout
    r = slm("zoo", "phi-nano", "--init", str(tmp_path / "phi"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "phi" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "phi" / "config.json").read_text())
    assert cfg["model_type"] == "phi" and cfg["hidden_size"] == 128
    # a TinyLlama checkpoint comes with the Llama-2 tokenizer, so it generates at once (random text)
    assert slm("zoo", "tinyllama-nano", "--init", str(tmp_path / "tl")).returncode == 0
    r = slm("generate", "-m", str(tmp_path / "tl"), "Hello", "--max-new-tokens", "5", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] == 5


def test_quickstart_runs(smol):
    r = slm("quickstart", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "What is the capital of France?" in r.stdout and "Paris" in r.stdout
    assert "tinyllama-1.1b" in r.stdout and "Next:" in r.stdout


def test_data_and_tokenizer_commands(tmp_path):
    r = slm("data", "list")
    assert r.returncode == 0 and "python-docs" in r.stdout and "python-stdlib" in r.stdout
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Note {i}: the quick brown fox jumps over dog {i}."}) + "\n"
                              for i in range(40)))
    r = slm("tokenizer", "train", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "400")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    r = slm("data", "prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    assert "40 documents" in r.stdout and "validation tokens" in r.stdout
    corpus.write_text('{"text": "ok"}\n{"text": 5}\n')
    r = slm("data", "prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"))
    assert r.returncode == 1 and "notes.jsonl:2: the text field must be a string" in r.stderr


def test_unknown_command_is_a_usage_error_not_a_traceback():
    r = slm("nonexistent-command")
    assert r.returncode == 2 and "No such command" in r.stderr and "Traceback" not in r.stderr


def test_shared_option_groups_take_per_command_defaults():
    """A command can override the shared FinetuneArgs defaults (the nano CLIP trains from scratch at 1e-3);
    the others keep the dataclass's."""
    import inspect

    from slmkit.cli.commands import workflow_command
    from slmkit.domains.llava_phi import CLIP_TRAIN
    from slmkit.train import FinetuneArgs
    from slmkit.workflows import by_command

    clip = inspect.signature(workflow_command(by_command()["llava vision-pretrain"], None)).parameters
    assert {k: clip[f"train_args__{k}"].default for k in CLIP_TRAIN} == CLIP_TRAIN
    train = inspect.signature(workflow_command(by_command()["llava train"], None)).parameters
    assert train["train_args__lr"].default == FinetuneArgs().lr
