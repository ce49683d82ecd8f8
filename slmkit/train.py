"""The one training loop. Objectives (causal LM, masked LM, ...) plug in as loss functions.

Runs on `accelerate`: the same code trains on one CPU, or on several processes/GPUs under
`accelerate launch` / `torchrun` (DDP). A run directory holds everything:

    runs/NAME/config.json            the resolved arguments
    runs/NAME/metrics.jsonl          one JSON object per logged step / evaluation
    runs/NAME/checkpoints/step-N/    HF model directory + trainer_state.pt (optimizer, scheduler, RNG)
    runs/NAME/checkpoints/latest     the name of the newest complete checkpoint
    runs/NAME/model/                 the final model (HF directory, with tokenizer)
    runs/NAME/loss.png               training and validation loss

Checkpoints are written to a temporary directory and renamed, so a run killed at any moment (even with
`kill -9`) resumes from its last complete checkpoint; data order and RNG state are restored, so the resumed
loss curve continues the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.runs import StageStatus

RUNS_DIR = Path("runs")  # where every workflow writes its run directories unless told otherwise


@dataclass
class TrainArgs:
    """Optimisation and run settings shared by every training workflow (defaults: the TinyLlama recipe)."""

    steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per process per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    lr: float = field(default=4e-4, metadata={"help": "Peak learning rate."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final LR as a fraction of the peak (cosine)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (RoBERTa: 0.98)."})
    clip: float = field(default=1.0, metadata={"help": "Gradient-norm clipping (0 = off)."})
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (mixed precision autocast)."})
    grad_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward "
                                                                       "(less memory, ~30% slower)."})
    eval_every: int = field(default=100, metadata={"help": "Steps between validation runs (0 = only at end)."})
    eval_batches: int = field(default=20, metadata={"help": "Validation batches per evaluation."})
    save_every: int = field(default=200, metadata={"help": "Steps between checkpoints (0 = only at end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest checkpoints kept on disk."})
    log_every: int = field(default=10, metadata={"help": "Steps between metrics lines."})
    seed: int = field(default=0, metadata={"help": "Seed for init, data order, masking and dropout."})
    tensorboard: bool = field(default=False, metadata={"help": "Also write metrics as TensorBoard events to "
                                                                 "RUN/tensorboard (pip install tensorboard)."})

    def validate(self) -> TrainArgs:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise SlmError(f"lr must be > 0 (got {self.lr})")
        if self.precision not in ("fp32", "bf16"):
            raise SlmError(f"precision must be fp32 or bf16 (got {self.precision})")
        return self


@dataclass
class FinetuneArgs(TrainArgs):
    """TrainArgs with fine-tuning defaults (short, low learning rate, no weight decay)."""

    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Examples per process per micro-batch."})
    seq_len: int = field(default=512, metadata={"help": "Longest example in tokens (longer ones are cut)."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (LoRA; use ~2e-5 for full)."})
    warmup_steps: int = field(default=10, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)."})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    eval_every: int = field(default=50, metadata={"help": "Steps between validation runs (0 = only at end)."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints (0 = only at end)."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Batch examples of similar length together (less padding; the order stays seeded)."})


# An objective maps (model, batch of token ids, step generator) to (loss, number of predicted tokens).
Objective = Callable[..., tuple]


def lr_lambda(args: TrainArgs) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio * peak at the last step."""

    def f(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model, args: TrainArgs):
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)


# --- checkpoints -----------------------------------------------------------------------------------------


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, args: TrainArgs,
                    tokens: int = 0) -> Path:
    import numpy as np
    import torch

    from slmkit.models import save_pretrained_atomic

    ckpt_root = run_dir / "checkpoints"
    target = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".step-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained_atomic(model, tokenizer, tmp)
    state = {"step": step, "tokens": tokens, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
             "args": asdict(args)}
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    write_atomic(ckpt_root / "latest", target.name)
    older = sorted(p for p in ckpt_root.glob("step-*") if p != target)
    for old in older[:max(0, len(older) - (args.keep_checkpoints - 1))]:  # keep the newest keep_checkpoints
        shutil.rmtree(old, ignore_errors=True)
    return target


def restore_checkpoint(ckpt: Path, model, optimizer, scheduler) -> tuple[int, int]:
    """Load weights (or a LoRA adapter), optimizer, scheduler and RNG state; return (step, tokens seen)."""
    from safetensors.torch import load_file

    if (ckpt / "adapter_model.safetensors").is_file():  # a peft (LoRA) model: only the adapter was saved
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise SlmError(f"{ckpt} holds an adapter that does not match this model")
        return _restore_state(ckpt, optimizer, scheduler)
    weights = load_file(ckpt / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if [k for k in missing if k not in tied] or unexpected:
        raise SlmError(f"{ckpt} does not match this model (missing {missing[:1]}, unexpected {unexpected[:1]})")
    return _restore_state(ckpt, optimizer, scheduler)


def _restore_state(ckpt: Path, optimizer, scheduler) -> tuple[int, int]:
    import numpy as np
    import torch

    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"], int(state.get("tokens", 0))


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume from `step`, drop metrics logged past it by the interrupted run."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))


# --- the loop --------------------------------------------------------------------------------------------


def to_device(batch, device):
    """A batch is a tensor of token ids or a dict of tensors (ids, labels, attention mask...)."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def count_tokens(batch) -> int:
    return int(batch["attention_mask"].sum()) if isinstance(batch, dict) else batch.numel()


def evaluate(model, objective: Objective, batches) -> float:
    """Mean loss per predicted token over the given batches (no dropout, no gradients)."""
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            gen = torch.Generator().manual_seed(10_000 + i)  # fixed masks for MLM: comparable evaluations
            loss, n = objective(model, to_device(batch, device), gen)
            total += float(loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def train(model, tokenizer, train_data, val_data, objective: Objective, args: TrainArgs, run_dir: Path, *,
          resume: bool = False, config: dict | None = None, progress: bool = True) -> dict:
    """Train `model` on `train_data` (a PackedTokens) with `objective`; returns a summary dict."""
    import torch
    from accelerate import Accelerator

    from slmkit.models import quiet_transformers

    args.validate()
    quiet_transformers()
    run_dir = Path(run_dir)
    accelerator = Accelerator(mixed_precision="bf16" if args.precision == "bf16" else "no",
                              cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and main:
        print(f"no checkpoint in {run_dir}; starting from step 0")
        if (run_dir / "metrics.jsonl").exists():  # lines of an attempt that left no checkpoint
            truncate_metrics(run_dir / "metrics.jsonl", 0)
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise SlmError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup = {"distributed": str(accelerator.distributed_type).split(".")[-1],
                 "processes": accelerator.num_processes}
        write_atomic(run_dir / "config.json", json.dumps({**(config or {}), "train": asdict(args), **setup},
                                                         indent=2))
    torch.manual_seed(args.seed + accelerator.process_index)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = make_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    start, total_tokens = restore_checkpoint(ckpt, model, optimizer, scheduler) if ckpt else (0, 0)
    if ckpt and main:
        truncate_metrics(run_dir / "metrics.jsonl", start)
    model, optimizer = accelerator.prepare(model, optimizer)
    metrics = open(run_dir / "metrics.jsonl", "a") if main else None
    board = tensorboard_writer(run_dir) if main and args.tensorboard else None
    rank, world = accelerator.process_index, accelerator.num_processes
    summary: dict = {"start_step": start}

    def log(row: dict) -> None:
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if board:
            for key, value in row.items():
                if key != "step":
                    board.add_scalar(key, value, row["step"])
            board.flush()

    def run_eval(step: int) -> float:
        loss = evaluate(model, objective, val_data.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
        log({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        return loss

    status = StageStatus(run_dir, total=args.steps, start=start) if main else None
    try:
        bar = _progress(progress and main)
        task = bar.add_task("train", total=args.steps, completed=start, loss=float("nan"), tps=float("nan"))
        t0, window_tokens, loss_sum = time.perf_counter(), 0, 0.0
        with bar:
            for step in range(start, args.steps):
                for micro in range(args.grad_accum):
                    batch = to_device(train_data.train_batch(step * args.grad_accum + micro, args.batch_size,
                                                             args.seq_len, args.seed, rank, world), accelerator.device)
                    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + micro * 31 + rank)
                    sync = micro == args.grad_accum - 1
                    with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                        with accelerator.autocast():
                            loss, _ = objective(model, batch, gen)
                        accelerator.backward(loss / args.grad_accum)
                    loss_sum += float(loss.detach()) / args.grad_accum
                    window_tokens += count_tokens(batch) * world
                if args.clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if done % args.log_every == 0 or done == args.steps:
                    n = (done - 1) % args.log_every + 1
                    elapsed = time.perf_counter() - t0
                    row = {"step": done, "loss": loss_sum / n, "lr": scheduler.get_last_lr()[0],
                           "tokens_per_s": window_tokens / elapsed, "tokens": total_tokens + window_tokens}
                    total_tokens += window_tokens
                    log(row)
                    bar.update(task, loss=row["loss"], tps=row["tokens_per_s"])
                    if status:
                        status.write(step=done)
                    t0, window_tokens, loss_sum = time.perf_counter(), 0, 0.0
                bar.update(task, completed=done)
                if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                    run_eval(done)
                if args.save_every and done % args.save_every == 0 and done != args.steps:
                    accelerator.wait_for_everyone()
                    if main:
                        save_checkpoint(run_dir, done, accelerator.unwrap_model(model), tokenizer, optimizer,
                                        scheduler, args, total_tokens + window_tokens)
        summary["val_loss"] = run_eval(args.steps)
        accelerator.wait_for_everyone()
        if main:
            unwrapped = accelerator.unwrap_model(model)
            save_checkpoint(run_dir, args.steps, unwrapped, tokenizer, optimizer, scheduler, args,
                            total_tokens + window_tokens)
            from slmkit.models import save_pretrained_atomic

            if args.grad_checkpointing:
                unwrapped.gradient_checkpointing_disable()
            if hasattr(unwrapped, "merge_and_unload"):  # LoRA: keep the adapter, save the merged model
                save_pretrained_atomic(unwrapped, tokenizer, run_dir / "adapter")
                unwrapped = merge_adapter(unwrapped, run_dir / "adapter")
            save_pretrained_atomic(unwrapped, tokenizer, run_dir / "model")
            metrics.close()
            if board:
                board.close()
            plot_metrics(run_dir)
    except BaseException as e:  # Ctrl-C, SIGTERM or an error: status.json says which, then it propagates
        if status:
            status.end(e)
        raise
    if status:
        status.end(None)
    summary["val_ppl"] = math.exp(min(summary["val_loss"], 50))
    return summary


def merge_adapter(peft_model, adapter_dir: Path):
    """The base model with the LoRA adapter merged in. A 4-bit (QLoRA) base is reloaded in full precision
    from its checkpoint first, so the saved model is an ordinary one."""
    base = peft_model.get_base_model()
    if not getattr(base, "is_loaded_in_4bit", False):
        return peft_model.merge_and_unload()
    from peft import PeftModel

    from slmkit.models import load_dir

    full = load_dir(Path(base.config._name_or_path), dtype="fp32").model
    return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()


def tensorboard_writer(run_dir: Path):
    """A TensorBoard event writer in RUN_DIR/tensorboard (`tensorboard --logdir runs`)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SlmError("--tensorboard needs the tensorboard package: pip install 'slmkit[tensorboard]'") from e
    return SummaryWriter(str(run_dir / "tensorboard"))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from slmkit.progress import FieldColumn, Progress

    return Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                    FieldColumn("loss", "loss {:.4f}"), FieldColumn("tps", "{:,.0f} tok/s"),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_metrics(run_dir: Path) -> Path | None:
    """loss.png: training loss per logged step and validation loss; the loss axis is logarithmic when the
    curve spans more than a factor of 10, so the late steps stay readable under a high first loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation loss")
    losses = [r["loss"] for r in train_rows] + [r["val_loss"] for r in val_rows]
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
