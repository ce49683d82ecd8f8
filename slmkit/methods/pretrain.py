"""Pretraining: causal-LM (TinyLlama / LiteLlama / Phi) and masked-LM (RoBERTa) on packed text.

- Causal LM: next-token cross-entropy over packed windows (documents separated by end-of-text).
- Masked LM, the RoBERTa recipe: *dynamic* masking (a fresh 15% of positions every time a window is seen;
  of those 80% become <mask>, 10% a random token, 10% stay), no next-sentence prediction, contiguous
  full-sentence packing across documents, AdamW with beta2 = 0.98.

`pretrain()` is the workflow behind `slm pretrain`: pick a model (a zoo spec built fresh at the tokenizer's
vocabulary size, or a checkpoint to continue), a tokenizer, a corpus; tokenise once into a cache; train.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.train import RUNS_DIR, TrainArgs, train, write_atomic


def causal_lm_objective(model, batch, generator):
    out = model(input_ids=batch, labels=batch)
    return out.loss, batch.numel() - batch.shape[0]


def window_nll(model, val_data, logp, args) -> dict:
    """Per validation window (the windows training validates on): the causal LM's mean NLL of its next tokens and
    the unigram baseline's on the same tokens, with the token count; for a bootstrap interval of the difference."""
    import torch

    out: dict = {"model": [], "unigram": [], "tokens": []}
    model.eval()
    with torch.no_grad():
        for batch in val_data.eval_batches(args.batch_size, args.seq_len, args.eval_batches):
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            out["model"] += nll.mean(1).tolist()
            out["unigram"] += (-logp[batch[:, 1:].numpy()]).mean(1).tolist()
            out["tokens"] += [batch.shape[1] - 1] * batch.shape[0]
    return out


def mask_tokens(ids, tokenizer, generator, prob: float = 0.15):
    """RoBERTa dynamic masking. Returns (inputs, labels) with labels = -100 where nothing is predicted."""
    import torch

    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    candidates = ~torch.isin(ids, special)
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & candidates
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    randomise = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomise] = torch.randint(len(tokenizer), ids.shape, generator=generator)[randomise]
    return inputs, labels


def mlm_objective(tokenizer, prob: float = 0.15):
    if tokenizer.mask_token_id is None:
        raise SlmError("masked-LM pretraining needs a tokenizer with a mask token (slm tokenizer train adds <mask>)")

    def objective(model, batch, generator):
        inputs, labels = mask_tokens(batch, tokenizer, generator, prob)
        out = model(input_ids=inputs, labels=labels.to(batch.device))
        return out.loss, int((labels != -100).sum())

    return objective


def initialise(model: str, tokenizer_dir: Path, out: Path, seq_len: int, seed: int) -> str:
    """MODEL built fresh (a zoo spec) with the tokenizer in TOKENIZER_DIR, or a checkpoint checked against it,
    saved once to OUT as the starting point of a run (an existing OUT is reused, so runs resume)."""
    from transformers import AutoTokenizer

    from slmkit.models import save_pretrained_atomic

    if not Path(out).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        net, _ = build_or_load(model, tokenizer, seq_len, seed)
        save_pretrained_atomic(net, tokenizer, out)
    return str(out)


def build_or_load(model: str, tokenizer, seq_len: int, seed: int):
    """A zoo spec is built fresh with the tokenizer's vocabulary and a context >= seq_len; anything else
    is loaded as a checkpoint to continue from (its vocabulary must match the tokenizer's)."""
    from slmkit import zoo
    from slmkit.models import load

    if zoo.is_zoo_name(model) and zoo.get(model).package is None:
        spec = zoo.get(model)
        if spec.task not in ("causal-lm", "masked-lm", "seq2seq"):
            raise SlmError(f"{spec.name} is a {spec.task} model; `slm pretrain` trains causal-LM, masked-LM and "
                           "encoder-decoder specs")
        config = dict(spec.config)
        config["vocab_size"] = len(tokenizer)
        if "max_position_embeddings" in config:  # T5 has relative positions, no table
            offset = 2 if spec.task == "masked-lm" else 0  # RoBERTa positions start after the padding index
            config["max_position_embeddings"] = max(config["max_position_embeddings"], seq_len + offset)
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        if spec.task == "seq2seq":  # T5 starts decoding from the padding token
            config["decoder_start_token_id"] = tokenizer.pad_token_id
        return zoo.build_model(replace(spec, config=config), seed=seed), spec.task
    loaded = load(model, dtype="fp32")
    if loaded.model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise SlmError(f"{model} has {loaded.model.get_input_embeddings().num_embeddings} token embeddings but the "
                       f"tokenizer has {len(tokenizer)} tokens: they do not belong together")
    return loaded.model, loaded.task


def pretrain(
    model: str = "tinyllama-nano",
    data: str = "python-docs",
    tokenizer: str | None = None,
    objective: str | None = None,
    run: str = "pretrain",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    train_args: TrainArgs | None = None,
    progress: bool = True,
) -> dict:
    """Pretrain a causal LM (TinyLlama/LiteLlama/Phi recipe), a masked LM (RoBERTa recipe) or an encoder-decoder (T5
    span corruption, e.g. -m flan-t5-nano) on a corpus.

    Pretrain a zoo spec from scratch (or continue a checkpoint) on a corpus; returns the run summary.

    `tokenizer`: `llama2`, a model/tokenizer path, or `bpe:N` to train an N-token byte-level BPE on the
    corpus (cached). Default: the model's own tokenizer for checkpoints, `bpe:8192` for zoo specs.
    `objective`: `clm`, `mlm` or `span` (default from the model: masked-LM specs get `mlm`, encoder-decoders
    T5's span corruption: 15% of tokens in spans of mean length 3, each replaced by a sentinel).

    Args:
        model: A zoo spec to build fresh (e.g. tinyllama-nano, roberta-nano) or a checkpoint to continue.
        data: Corpus name, .txt/.jsonl file or directory.
        tokenizer: llama2, a model/tokenizer path, or bpe:N (trained on the data). Default: bpe:8192 for a fresh spec.
        objective: clm (causal LM), mlm (RoBERTa masking) or span (T5 span corruption); default from the model.
    """
    from slmkit import zoo
    from slmkit.data.packing import PackedTokens, unigram_logp, unigram_perplexity
    from slmkit.data.prepare import prepare_corpus, resolve_tokenizer, source_key

    args = (train_args or TrainArgs()).validate()
    fresh = zoo.is_zoo_name(model) and zoo.get(model).package is None
    tok_name = tokenizer or ("bpe:8192" if fresh else model)
    source_key(data)  # fail early on a bad corpus name or path, before building anything
    tok = resolve_tokenizer(tok_name, data)
    net, task = build_or_load(model, tok, args.seq_len, args.seed)
    fits = {"masked-lm": "mlm", "seq2seq": "span", "causal-lm": "clm"}
    objective = objective or fits[task]
    if objective not in fits.values():
        raise SlmError(f"unknown objective '{objective}' (clm, mlm or span)")
    if objective != fits[task]:
        raise SlmError(f"objective {objective} does not fit a {task} model (it takes {fits[task]})")
    data_dir = prepare_corpus(data, tok, progress=progress)
    train_data, val_data = PackedTokens.open(data_dir, "train"), PackedTokens.open(data_dir, "val")
    if objective == "span":
        from slmkit.methods.ul2r import Denoiser, UL2Objective

        loss_fn = UL2Objective(tok, net, [Denoiser("R", 3, 0.15, 1.0)])  # adds the sentinel tokens
    else:
        loss_fn = causal_lm_objective if objective == "clm" else mlm_objective(tok)
    config = {"workflow": "pretrain", "model": model, "data": data, "data_dir": str(data_dir),
              "tokenizer": tok_name, "objective": objective, "parameters": net.num_parameters(),
              "train_tokens": len(train_data.tokens), "val_tokens": len(val_data.tokens)}
    summary = train(net, tok, train_data, val_data, loss_fn, args, Path(runs_dir) / run, resume=resume,
                    config=config, progress=progress)
    # the baseline to beat: token frequencies alone (for MLM, predicting each masked token by its frequency)
    summary["unigram_ppl"] = unigram_perplexity(train_data, val_data, len(tok))
    if objective == "clm":  # each validation window's NLL, model and unigram, for an interval of the difference
        summary["per_window"] = window_nll(net, val_data, unigram_logp(train_data, len(tok)), args)
    summary.update(run_dir=str(Path(runs_dir) / run), parameters=net.num_parameters(),
                   val_ppl=math.exp(min(summary["val_loss"], 50)))
    if int(os.environ.get("RANK", "0")) == 0:
        write_atomic(Path(runs_dir) / run / "pretrain.json", json.dumps(summary, indent=2) + "\n")
    return summary


def report(s: dict, args: dict, out) -> None:
    """Print what `slm pretrain` reports."""
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, one process reports
        return
    baseline = f" (unigram baseline {s['unigram_ppl']:.1f})" if "unigram_ppl" in s else ""
    out.print(f"done: validation loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.1f}{baseline}; "
              f"model in {s['run_dir']}/model, curves in {s['run_dir']}/loss.png")
