"""Supervised fine-tuning (SFT) of a language model on chat or prompt/completion data, and fine-tuning of an
encoder with a classification head on text/label data.

The loss is on answer tokens only: for chat data every assistant turn is trained (multi-turn masking) and
user/system turns are context; for prompt/completion data the completion (and end token) is trained.
Fine-tuning is full, or LoRA adapters (`peft`) on every linear layer, merged into the saved model at the end
(the adapter is kept beside it). Runs go through the one training loop in `slmkit/train.py`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from slmkit.data.sft import ClassificationData, SFTData, load_classification, load_records, split
from slmkit.errors import SlmError
from slmkit.train import RUNS_DIR, FinetuneArgs, evaluate, train

# --- data ------------------------------------------------------------------------------------------------


def classification_objective(model, batch, generator):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, len(batch["labels"])


def accuracy(model, data: ClassificationData, batch_size: int = 32) -> float:
    import torch

    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in data.eval_batches(batch_size, 0, len(data)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(data)


def classifier_from(source: str, labels: list[str]):
    """A sequence classifier with a fresh head over an encoder checkpoint (e.g. MiniLM or a pretrained run)."""
    from transformers import AutoModelForSequenceClassification

    from slmkit.models import load

    base = load(source, dtype="fp32")
    if base.path is None or base.tokenizer is None:
        raise SlmError(f"{source}: classification fine-tuning needs a pretrained checkpoint with a tokenizer "
                       "(e.g. all-minilm-l6-v2, or runs/NAME/model from `slm pretrain -m roberta-nano`)")
    model = AutoModelForSequenceClassification.from_pretrained(
        base.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})
    if base.tokenizer.pad_token_id is None:  # causal LMs: the head reads the last token before padding
        base.tokenizer.pad_token = base.tokenizer.eos_token
    model.config.pad_token_id = base.tokenizer.pad_token_id
    return model, base.tokenizer


def sft_objective(model, batch, generator):
    """Next-token cross-entropy on answer tokens. The LM head runs only at the positions that are scored:
    with a 49k vocabulary most of an SFT step's time would otherwise go to logits of prompt and padding.
    A batch with `pixel_values` (LLaVA-ϕ) passes the images on; they are spliced in at the image tokens."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    if inner.config.is_encoder_decoder:  # the decoder's labels are all answer tokens (or padding)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, int((batch["labels"] != -100).sum())
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    plain_head = not any(getattr(inner.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or not plain_head:
        # DDP must see its own forward (gradient sync); soft-capped heads need the model's own logits
        out = model(**inputs, labels=batch["labels"])
        return out.loss, int(keep.sum())
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(**inputs).last_hidden_state
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep]), int(keep.sum())


# --- the workflow ----------------------------------------------------------------------------------------


def add_lora(model, r: int, alpha: int, dropout: float, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    heads = ["score", "classifier"] if task_type in ("SEQ_CLS", "TOKEN_CLS") else None  # new heads train fully
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        exclude_modules=heads, task_type=task_type)
    return get_peft_model(model, config)


def finetune(
    model: str | None = None,
    data: str = "chatterbot-en",
    task: str = "chat",
    val_data: str | None = None,
    val_fraction: float = 0.1,
    lora: bool | None = None,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    qlora: bool = False,
    run: str = "finetune",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
    objective=None,
) -> dict:
    """Fine-tune: chat SFT with loss on answer tokens only (LoRA merged at the end), or a classifier head.

    Fine-tune a model and return the run summary with held-out scores before and after.

    task `chat`: a causal LM (default: the embedded model) or an encoder-decoder (T5: the input is the prompt
    or the turns before each answer) on chat or prompt/completion data, loss on answers only; LoRA by default.
    task `classify`: an encoder (default: all-minilm-l6-v2) with a new classification head on {"text", "label"}
    data (default set: chatterbot-topics); full fine-tuning by default.
    `qlora`: the frozen base is loaded in 4-bit NF4 (bitsandbytes) and LoRA adapters train on top; the saved
    model merges the adapter into the full-precision base.
    `objective`: replaces the chat task's loss (`sft_objective`), e.g. FLAME's with its retrieval term.

    Args:
        data: chat: chatterbot-en or a .jsonl of {"messages": [...]} or {"prompt", "completion"}; classify:
            chatterbot-topics or a .jsonl of {"text", "label"}.
        task: chat (causal LM, answer-only loss) or classify (encoder + classification head; default model
            all-minilm-l6-v2).
        val_data: Held-out examples (default: a split of --data).
        val_fraction: Fraction held out when --val-data is not given.
        lora: LoRA adapters on all linear layers, or full fine-tuning (default: LoRA for chat, full for classify).
        lora_dropout: Dropout on the LoRA adapters' input.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling alpha.
        qlora: QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes) under the LoRA adapters; the saved model is
            merged in full precision.
    """
    args = (train_args or FinetuneArgs()).validate()
    if task not in ("chat", "classify"):
        raise SlmError(f"unknown task '{task}' (chat or classify)")
    if qlora and (task != "chat" or lora is False):
        raise SlmError("--qlora trains LoRA adapters on a 4-bit chat model (not with --full or --task classify)")
    load_fn = load_records if task == "chat" else load_classification
    if task == "classify" and data == "chatterbot-en":
        data = "chatterbot-topics"
    records = load_fn(data)
    if val_data:
        train_records, val_records = records, load_fn(val_data)
    else:
        if len(records) < 2:
            raise SlmError(f"{data} has {len(records)} example(s); need at least 2 to hold one out")
        train_records, val_records = split(records, val_fraction, args.seed)
    if task == "chat":
        net, tok, train_set, val_set, sft = _chat_setup(model, train_records, val_records, args, qlora)
        objective = objective or sft
    else:
        labels = sorted({r["label"] for r in train_records})
        net, tok = classifier_from(model or "all-minilm-l6-v2", labels)
        train_set = ClassificationData(tok, train_records, labels, args.seq_len)
        val_set = ClassificationData(tok, val_records, labels, args.seq_len)
        if objective is not None:
            raise SlmError("a custom objective replaces the chat task's loss (not --task classify)")
        objective = classification_objective
    if lora if lora is not None else task == "chat":
        kind = "SEQ_CLS" if task == "classify" else "SEQ_2_SEQ_LM" if net.config.is_encoder_decoder else "CAUSAL_LM"
        if qlora:
            from peft import prepare_model_for_kbit_training

            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=args.grad_checkpointing)
        net = add_lora(net, lora_r, lora_alpha, lora_dropout, kind)
    before = evaluate(net, objective, val_set.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
    extra = {"val_accuracy_before": accuracy(net, val_set)} if task == "classify" else {}
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    config = {"workflow": "finetune", "task": task, "model": model, "data": data, "val_data": val_data,
              "lora": bool(lora if lora is not None else task == "chat"), "lora_r": lora_r, "lora_alpha": lora_alpha,
              "qlora": qlora,
              "train_examples": len(train_set), "val_examples": len(val_set), "trainable_parameters": trainable,
              "val_loss_before": before, **extra}
    summary = train(net, tok, train_set, val_set, objective, args, Path(runs_dir) / run, resume=resume,
                    config=config, progress=progress)
    if task == "classify":
        extra["val_accuracy"] = accuracy(net, val_set)
    summary.update(val_loss_before=before, val_ppl_before=math.exp(before), trainable_parameters=trainable,
                   run_dir=str(Path(runs_dir) / run), **extra)
    return summary


def _chat_setup(model: str | None, train_records, val_records, args: FinetuneArgs, qlora: bool = False):
    from slmkit.models import load

    loaded = load(model, dtype="fp32", quantize="nf4" if qlora else None)
    if loaded.task not in ("causal-lm", "seq2seq"):
        raise SlmError(f"{loaded.name} is a {loaded.task} model; chat fine-tuning trains causal LMs and "
                       "encoder-decoders (use --task classify for encoders)")
    if loaded.tokenizer is None:
        raise SlmError(f"{loaded.name} has no tokenizer to fine-tune with")
    tok, enc_dec = loaded.tokenizer, loaded.task == "seq2seq"
    train_set = SFTData(tok, train_records, args.seq_len, enc_dec, args.group_by_length)
    val_set = SFTData(tok, val_records, args.seq_len, enc_dec)
    return loaded.model, tok, train_set, val_set, sft_objective


def report(s: dict, args: dict, out) -> None:
    """Print what `slm finetune` reports."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out.print(f"done: held-out loss {s['val_loss_before']:.4f} -> {s['val_loss']:.4f} "
              f"({s['trainable_parameters']:,} trainable parameters); model in {s['run_dir']}/model")
    if "val_accuracy" in s:
        out.print(f"held-out accuracy {s['val_accuracy_before']:.3f} -> {s['val_accuracy']:.3f}")
