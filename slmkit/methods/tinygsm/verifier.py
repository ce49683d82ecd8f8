"""TinyGSM's verifier: the generator's own samples, labelled by execution, train a one-output head to
predict correctness at every token (`verify_train`); a program's score is the value at its last token.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.data.corpora import write_jsonl
from slmkit.data.records import read_jsonl
from slmkit.data.sft import SFTData, completion_example
from slmkit.errors import SlmError
from slmkit.methods.tinygsm.data import matches, training_problems
from slmkit.methods.tinygsm.generator import program_prompt, solve
from slmkit.train import RUNS_DIR, FinetuneArgs


class VerifierData(SFTData):
    """(program prompt + sampled body, correct?) examples, batched like SFTData; the value head is trained on
    the body's tokens."""

    def __init__(self, tokenizer, rows: list[dict], seq_len: int):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoder_decoder = False
        self.examples = []
        for r in rows:
            ids, labels = completion_example(tokenizer, r["prompt"], r["completion"])
            self.examples.append((ids[:seq_len], labels[:seq_len], bool(r["correct"])))

    def collate(self, items):
        import torch

        batch = super().collate([(ids, labels) for ids, labels, _ in items])
        batch["correct"] = torch.tensor([correct for *_, correct in items], dtype=torch.float32)
        return batch


def verifier_objective(model, batch, generator):
    """Binary cross-entropy of the value head against the solution's correctness at every solution token."""
    import torch

    values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., 0]
    scored = batch["labels"] != -100
    target = batch["correct"][:, None].expand_as(values)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(values[scored].float(), target[scored])
    return loss, int(scored.sum())


def verifier_from(source: str):
    """A causal LM checkpoint as a token-level value model: the LM's backbone with a one-output head (a standard
    `...ForTokenClassification` directory when saved)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    from slmkit.models import load

    base = load(source, dtype="fp32", progress=False)
    if base.task != "causal-lm" or base.path is None or base.tokenizer is None:
        raise SlmError(f"{source}: the verifier starts from a causal LM checkpoint with a tokenizer")
    config = AutoConfig.from_pretrained(base.path, num_labels=1)
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(base.path, config=config)
    if base.tokenizer.pad_token_id is None:
        base.tokenizer.pad_token = base.tokenizer.eos_token
    model.config.pad_token_id = base.tokenizer.pad_token_id
    return model, base.tokenizer


def verifier_scores(model, tokenizer, programs: list[str], batch_size: int = 16, progress: bool = False) -> list[float]:
    """P(correct) of each full program: the value head at its last token."""
    import torch

    from slmkit.progress import Progress

    tokenizer.padding_side = "right"
    scores = []
    model.eval()
    with torch.inference_mode(), Progress(disable=not progress) as bar:
        job = bar.add_task(f"scoring {len(programs)} programs with the verifier", total=len(programs))
        for start in range(0, len(programs), batch_size):
            enc = tokenizer(programs[start:start + batch_size], return_tensors="pt", padding=True)
            values = model(**enc).logits[..., 0].float()
            last = enc.attention_mask.sum(1) - 1
            scores += torch.sigmoid(values[torch.arange(len(last)), last]).tolist()
            bar.advance(job, len(last))
    return scores


def ranking_auc(scores: list[float], labels: list[bool]) -> float | None:
    """The chance that a right solution scores above a wrong one (ties count half): how well a verifier ranks,
    which is what best-of-N needs."""
    right = [s for s, ok in zip(scores, labels, strict=True) if ok]
    wrong = [s for s, ok in zip(scores, labels, strict=True) if not ok]
    if not right or not wrong:
        return None
    return sum((r > w) + 0.5 * (r == w) for r in right for w in wrong) / (len(right) * len(wrong))


def sample_labelled(loaded, rows: list[dict], sandbox, *, samples: int, temperature: float = 0.7,
                    max_new_tokens: int = 256, seed: int = 0, progress: bool = True,
                    partial: Path | None = None) -> list[dict]:
    """The generator's own solutions to training problems, each labelled by executing it against the answer."""
    solved = solve(loaded, [r["question"] for r in rows], sandbox, samples=samples, temperature=temperature,
                   max_new_tokens=max_new_tokens, seed=seed, progress=progress, partial=partial)
    out = []
    for r, sols in zip(rows, solved, strict=True):
        prompt = program_prompt(r["question"])
        out += [{"prompt": prompt, "completion": s.program[len(prompt):], "correct": matches(s.answer(), r["answer"]),
                 "status": s.status} for s in sols]
    return out


def verify_train(
    generator: str,
    data: str = "gsm.jsonl",
    base: str | None = None,
    problems: int = 200,
    samples: int = 8,
    temperature: float = 0.7,
    lora: bool = False,
    layers: int | None = None,
    train_layers: int | None = None,
    run: str = "gsm-verifier",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    seed: int = 0,
    engine: str = "torch",
    unsandboxed: bool = False,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """Train a verifier: the generator's own solutions, labelled by execution, teach a value head to predict correctness
    at every token.

    Train a verifier: the `generator` samples `samples` solutions to `problems` training problems (of a
    `slm gsm data` file, or the `long-stories` split), each is labelled by execution, and a value model
    initialised from `base` (default: the generator) learns to predict correctness at every solution token.
    `layers` keeps only the base's first layers (a cheaper verifier from an LM's lower half); `train_layers`
    fine-tunes only the top layers, the final norm and the head (the rest frozen, so no backward pass runs
    through them). The samples are kept in the run directory and reused.

    Args:
        generator: The trained generator (runs/NAME/model from `slm gsm train`).
        data: Training problems: a file from `slm gsm data`, or long-stories (four-event stories whose templates the
            test set does not use).
        base: The verifier's starting LM (default: the generator).
        problems: Training problems to sample solutions for.
        samples: Solutions sampled per problem.
        temperature: Sampling temperature.
        layers: Keep only the base LM's first N layers (a cheaper verifier).
        train_layers: Fine-tune only the top N layers, final norm and head; the rest stay frozen.
    """
    from slmkit.data.sft import split_rows
    from slmkit.engines import open_model
    from slmkit.methods.finetune import FinetuneArgs, add_lora
    from slmkit.methods.kd import keep_layers, layers_of
    from slmkit.sandbox import Sandbox
    from slmkit.train import evaluate, train

    args = (train_args or FinetuneArgs()).validate()
    run_dir = Path(runs_dir) / run
    cache = run_dir / "samples.jsonl"
    if cache.is_file():
        labelled = [row for _, row in read_jsonl(cache)]
    else:
        rows = training_problems(str(data), problems)
        with Sandbox(2, unsandboxed=unsandboxed) as sandbox:
            labelled = sample_labelled(open_model(generator, engine, progress=progress), rows, sandbox,
                                       samples=samples, temperature=temperature, seed=seed, progress=progress,
                                       partial=run_dir / "samples.partial.jsonl")
        write_jsonl(labelled, cache)
        (run_dir / "samples.partial.jsonl").unlink(missing_ok=True)
    positives = sum(r["correct"] for r in labelled)
    if positives == 0 or positives == len(labelled):
        raise SlmError(f"all {len(labelled)} sampled solutions are {'right' if positives else 'wrong'}: a verifier "
                       "needs both; sample more problems or use a stronger/weaker generator")
    import torch

    torch.manual_seed(args.seed)  # the new value head's initialisation
    net, tok = verifier_from(base or generator)
    if layers:
        keep_layers(net, list(range(layers)))
    if train_layers is not None:
        blocks = layers_of(net)
        if not 0 < train_layers <= len(blocks):
            raise SlmError(f"train_layers must be in 1..{len(blocks)} (the verifier has {len(blocks)} layers)")
        for module in [net.get_input_embeddings(), *blocks[:len(blocks) - train_layers]]:
            module.requires_grad_(False)
    if lora:
        net = add_lora(net, 16, 32, 0.05, "TOKEN_CLS")
    # validation on problems the verifier never trains on (a problem's samples stay in one split)
    grouped = [{**r, "group": r["prompt"]} for r in labelled]
    train_rows, val_rows, _ = split_rows(grouped, max(1, round(0.1 * len(grouped))), 0)
    train_set, val_set = VerifierData(tok, train_rows, args.seq_len), VerifierData(tok, val_rows, args.seq_len)
    before = evaluate(net, verifier_objective, val_set.eval_batches(args.batch_size, args.seq_len, args.eval_batches))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    config = {"workflow": "verify_train", "generator": generator, "base": base or generator, "layers": layers,
              "train_layers": train_layers, "trainable_parameters": trainable, "samples": len(labelled),
              "correct_fraction": positives / len(labelled)}
    summary = train(net, tok, train_set, val_set, verifier_objective, args, run_dir, resume=resume, config=config,
                    progress=progress)
    scores = verifier_scores(net, tok, [r["prompt"] + r["completion"] for r in val_rows])
    auc = ranking_auc(scores, [r["correct"] for r in val_rows])
    return {**summary, "trainable_parameters": trainable, "val_loss_before": before, "val_auc": auc,
            "samples": len(labelled), "correct_fraction": positives / len(labelled),
            "model_dir": str(run_dir / "model")}


def report(r: dict, args: dict, out) -> None:
    """Print what `slm gsm verify-train` reports."""
    auc = "-" if r["val_auc"] is None else f"{r['val_auc']:.3f}"
    out.print(f"{r['samples']} solutions ({r['correct_fraction']:.1%} correct); val loss {r['val_loss_before']:.3f} -> "
              f"{r['val_loss']:.3f}, ranking AUC of last-token scores {auc}; verifier -> {r['model_dir']}")
