"""Knowledge distillation (Hinton et al., 2015): a student learns a teacher's soft targets, optionally also
its hidden states and attention maps through a layer map (TinyBERT-style), for classifiers and language
models; with `length_adaptive`, Length-Adaptive Distillation (`slmkit.methods.length_adaptive`). The losses
and layer maps are in `slmkit.methods.kd`.

- `distill()`: the workflow behind `slm distill`. Classification (`task="classify"`): the teacher is a
  sequence classifier or a model fine-tuned on the data first; the student is any encoder checkpoint,
  optionally cut to some of its layers (`student_layers`). LM (`task="lm"`): a causal-LM teacher, a
  student checkpoint or zoo spec built with the teacher's tokenizer, a text corpus.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from slmkit.data.sft import split_rows
from slmkit.errors import SlmError
from slmkit.methods.finetune import FinetuneArgs
from slmkit.methods.kd import default_layer_map, kd_objective, keep_layers, use_eager_attention
from slmkit.methods.length_adaptive import (
    evaluate_lengths,
    general_objective,
    plot_frontier,
    save_length_config,
    search_lengths,
    task_objective,
)
from slmkit.train import RUNS_DIR, train, write_atomic


def _check_pair(teacher, student, hidden_weight: float, attention_weight: float, lm: bool) -> list[int]:
    """The default layer map, after checking that what is matched has matching shapes."""
    tc, sc = teacher.config, student.config
    if lm and tc.vocab_size != sc.vocab_size:
        raise SlmError(f"teacher vocabulary {tc.vocab_size} != student vocabulary {sc.vocab_size}: LM distillation "
                       "matches next-token distributions, so both need the same tokenizer")
    if hidden_weight and tc.hidden_size != sc.hidden_size:
        raise SlmError(f"hidden-state matching needs equal hidden sizes (teacher {tc.hidden_size}, student "
                       f"{sc.hidden_size}); set --hidden-weight 0")
    if attention_weight:
        use_eager_attention(teacher)
        use_eager_attention(student)
    return default_layer_map(sc.num_hidden_layers, tc.num_hidden_layers)


def teacher_classifier(teacher: str, labels: list[str], train_rows, val_rows, args: FinetuneArgs, steps: int,
                       run_dir: Path, resume: bool, progress: bool):
    """A sequence classifier for `labels`: `teacher` itself when it is one, otherwise `teacher` fine-tuned on
    the training split for `steps` steps (kept in run_dir; a rerun reuses it)."""
    from dataclasses import replace

    from slmkit.data.sft import ClassificationData
    from slmkit.methods.finetune import classification_objective, classifier_from
    from slmkit.models import load

    source = run_dir / "model" if (run_dir / "model").is_dir() else teacher
    loaded = load(str(source), dtype="fp32")
    if loaded.task == "classifier":
        have = [loaded.model.config.id2label[i] for i in range(loaded.model.config.num_labels)]
        if have != labels:
            raise SlmError(f"{source} classifies {have}, but the data's labels are {labels}")
        return loaded.model, loaded.tokenizer
    if steps < 1:
        raise SlmError(f"{teacher} is not a sequence classifier; give --teacher-steps > 0 to fine-tune it first")
    net, tok = classifier_from(teacher, labels)
    train(net, tok, ClassificationData(tok, train_rows, labels, args.seq_len),
          ClassificationData(tok, val_rows, labels, args.seq_len), classification_objective,
          replace(args, steps=steps), run_dir, resume=resume,
          config={"workflow": "distill", "stage": "teacher", "model": teacher}, progress=progress)
    return net.eval(), tok


def distill(
    teacher: str = "all-minilm-l6-v2",
    student: str | None = None,
    data: str = "spam-assassin",
    task: str = "classify",
    student_layers: list[int] | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    hidden_weight: float = 0.0,
    attention_weight: float = 0.0,
    teacher_steps: int = 300,
    length_adaptive: bool = False,
    general_steps: int = 200,
    max_drop: float = 0.5,
    sandwich: int = 2,
    baseline: bool = True,
    candidates: int = 40,
    tolerance: float = 1.0,
    val_size: int = 300,
    test_size: int = 600,
    run: str = "distill",
    runs_dir: Path = RUNS_DIR,
    resume: bool = False,
    train_args: FinetuneArgs | None = None,
    progress: bool = True,
) -> dict:
    """Knowledge distillation of a classifier or LM into a smaller student; --length-adaptive runs LAD and reports
    accuracy, FLOPs and CPU speed of both students under the chosen token-pruning configuration.

    Distil `teacher` into `student` (default: the teacher's own starting checkpoint) on `data`.

    classify: `data` is {"text", "label"} JSONL or a packaged set; a teacher that is not yet a classifier is
    fine-tuned on the training split first (`teacher_steps`); the student may keep only `student_layers`.
    With `length_adaptive`: LAD stage 1 (general distillation under pruning, `general_steps`), stage 2
    (task distillation with the sandwich rule), a length-configuration search on the validation split,
    and - with `baseline` - the same student distilled without LAD, both measured on the test split under
    the chosen configuration. lm: `data` is a text corpus (`slm data list`), the student a checkpoint or a
    zoo spec (built with the teacher's tokenizer).
    Each stage keeps its model in the run directory; a rerun skips finished stages.

    Args:
        teacher: classify: a classifier directory, or a model fine-tuned on the data first (--teacher-steps); lm: a
            causal LM.
        student: Student checkpoint or zoo spec (default for classify: the teacher's checkpoint).
        data: classify: {"text", "label"} JSONL or a packaged set; lm: a corpus (`slm data list`).
        task: classify or lm.
        student_layers: Keep only these layers of the student (repeatable, 0-based).
        temperature: Soft-target temperature.
        alpha: Weight of the soft targets (1 - alpha: gold labels).
        hidden_weight: Weight of mapped hidden-state MSE (0 = off).
        attention_weight: Weight of mapped attention-map MSE (0 = off).
        teacher_steps: Steps to fine-tune a teacher that is not a classifier.
        length_adaptive: Length-Adaptive Distillation: general + sandwich task distillation under token pruning, then
            a length search.
        general_steps: LAD stage-1 (general distillation) steps.
        max_drop: LAD: largest per-layer token drop ratio (LengthDrop).
        sandwich: LAD: random length configurations per step besides the full and smallest.
        baseline: LAD: also distil the student without LAD, for comparison.
        candidates: LAD: length configurations tried by the search.
        tolerance: LAD: accuracy points the chosen configuration may lose.
        val_size: classify: validation examples (the length search uses them).
        test_size: classify: held-out test examples.
    """
    args = (train_args or FinetuneArgs()).validate()
    if task not in ("classify", "lm"):
        raise SlmError(f"unknown task '{task}' (classify or lm)")
    if not 0 <= alpha <= 1 or temperature <= 0 or hidden_weight < 0 or attention_weight < 0 or sandwich < 0:
        raise SlmError("--alpha must be in [0, 1], --temperature > 0, --hidden-weight, --attention-weight and "
                       "--sandwich >= 0")
    run_dir = Path(runs_dir) / run
    if task == "lm":
        if length_adaptive:
            raise SlmError("--length-adaptive distils encoder classifiers (task classify)")
        return _distill_lm(teacher, student, data, student_layers, temperature, alpha, hidden_weight,
                           attention_weight, run_dir, resume, args, progress)
    from slmkit.data.sft import ClassificationData, load_classification
    from slmkit.methods.finetune import accuracy, classifier_from

    result_path = run_dir / "distill.json"
    if result_path.is_file() and not resume:  # finished before: report it
        return json.loads(result_path.read_text())
    rows = load_classification(data)
    labels = sorted({r["label"] for r in rows})
    train_rows, val_rows, test_rows = split_rows(rows, val_size, test_size)
    teacher_net, tok = teacher_classifier(teacher, labels, train_rows, val_rows, args, teacher_steps,
                                          run_dir / "teacher", resume, progress)
    sets = {name: ClassificationData(tok, r, labels, args.seq_len)
            for name, r in (("train", train_rows), ("val", val_rows), ("test", test_rows))}
    summary: dict = {"teacher": teacher, "data": data, "labels": labels, "val_size": val_size, "test_size": test_size,
                     "examples": {k: len(v) for k, v in sets.items()}, "run_dir": str(run_dir)}
    summary["teacher_test_accuracy"] = accuracy(teacher_net, sets["test"])

    def new_student():
        net, student_tok = classifier_from(student or teacher, labels)
        if student_tok.get_vocab() != tok.get_vocab():
            raise SlmError(f"student {student or teacher} and teacher {teacher} use different tokenizers; "
                           "classification distillation feeds both the same token ids")
        return keep_layers(net, student_layers) if student_layers else net

    def stage(name: str, net, objective, steps: int):
        from dataclasses import replace

        if (run_dir / name / "model").is_dir():  # finished before: reload it with the same attention
            from slmkit.models import load

            done = load(str(run_dir / name / "model"), dtype="fp32").model
            done.set_attn_implementation(net.config._attn_implementation)
            return done
        train(net, tok, sets["train"], sets["val"], objective, replace(args, steps=steps), run_dir / name,
              resume=resume, config={"workflow": "distill", "stage": name, "teacher": teacher,
                                     "student": student or teacher, "student_layers": student_layers},
              progress=progress)
        return net.eval()

    net = new_student()
    layer_map = _check_pair(teacher_net, net, hidden_weight, attention_weight, lm=False)
    kd = kd_objective(teacher_net, temperature=temperature, alpha=alpha, hidden_weight=hidden_weight,
                      attention_weight=attention_weight, layer_map=layer_map)
    summary["student_parameters"] = net.num_parameters()
    summary["teacher_parameters"] = teacher_net.num_parameters()
    if not length_adaptive:
        net = stage("student", net, kd, args.steps)
        summary["student_test_accuracy"] = accuracy(net, sets["test"])
    else:
        use_eager_attention(teacher_net)
        use_eager_attention(net)
        if teacher_net.config.hidden_size != net.config.hidden_size:
            raise SlmError("LAD imitates the teacher's hidden states: the student needs the teacher's hidden size "
                           f"({teacher_net.config.hidden_size}, student {net.config.hidden_size})")
        net = stage("general", net, general_objective(teacher_net, layer_map, max_drop), general_steps)
        net = stage("lad", net, task_objective(teacher_net, temperature, alpha, max_drop, sandwich), args.steps)
        plain = stage("kd", new_student(), kd, args.steps) if baseline else None
        summary.update(_measure_lad(net, plain, sets, run_dir, max_drop=max_drop, candidates=candidates,
                                    tolerance=tolerance, seed=args.seed, progress=progress))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(result_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _measure_lad(net, plain, sets: dict, run_dir: Path, *, max_drop: float, candidates: int, tolerance: float,
                 seed: int, progress: bool) -> dict:
    """Search length configurations for the LAD student on validation; report both students on test - unpruned,
    under the chosen configuration and under every configuration on the validation frontier (`test_curves` in
    search.json) - by accuracy, FLOPs and wall time; plot the frontier."""
    models = {"lad": net} | ({"kd": plain} if plain is not None else {})
    for model in models.values():  # the plain-KD student trains with SDPA attention
        use_eager_attention(model)
    search = search_lengths(net, sets["val"], candidates=candidates, max_drop=max_drop, tolerance=tolerance,
                            seed=seed, progress=progress)
    chosen = search["chosen"]["lengths"]
    save_length_config(run_dir / "lad" / "model", chosen, {k: search[k] for k in ("full", "chosen", "frontier")})
    out: dict = {"chosen_lengths": chosen, "student_model": str(run_dir / "lad" / "model")}
    for name, model in models.items():
        evaluate_lengths(model, sets["test"], None)  # warm-up: first calls pay one-off allocation costs
        full, pruned = (evaluate_lengths(model, sets["test"], lengths, items=True) for lengths in (None, chosen))
        out[name] = {"full": full, "pruned": pruned, "flops_ratio": full["flops"] / pruned["flops"],
                     "speedup": full["seconds"] / pruned["seconds"],
                     "accuracy_drop_points": 100 * (full["accuracy"] - pruned["accuracy"])}
    curves = {}
    if plain is not None:  # both students on the test split under the validation frontier's configurations
        tried = [p["lengths"] for p in search["frontier"] if p["lengths"] is not None]
        for name, model in models.items():
            curves[name] = [evaluate_lengths(model, sets["test"], lengths) for lengths in tried]
            full = out[name]["full"]
            half = [c for c in curves[name] if c["flops"] <= 0.5 * full["flops"]]
            out[name]["configs_at_half_flops"] = len(half)
            if half:
                out[name]["mean_drop_points_at_half_flops"] = 100 * (full["accuracy"] -
                                                                     sum(c["accuracy"] for c in half) / len(half))
    plot_frontier(search, run_dir / "frontier.png", curves, {k: out[k]["full"] for k in curves})
    write_atomic(run_dir / "search.json", json.dumps({**search, "test_curves": curves}, indent=2) + "\n")
    return out


def _distill_lm(teacher: str, student: str | None, data: str, student_layers, temperature: float, alpha: float,
                hidden_weight: float, attention_weight: float, run_dir: Path, resume: bool, args: FinetuneArgs,
                progress: bool) -> dict:
    from slmkit.data.packing import PackedTokens
    from slmkit.data.prepare import prepare_corpus
    from slmkit.methods.pretrain import build_or_load
    from slmkit.models import load

    t = load(teacher, dtype="fp32")
    if t.task != "causal-lm" or t.tokenizer is None:
        raise SlmError(f"{teacher}: LM distillation needs a causal-LM teacher with a tokenizer")
    if student is None:
        raise SlmError("LM distillation needs --student (a checkpoint or a zoo spec such as tinyllama-nano)")
    net, kind = build_or_load(student, t.tokenizer, args.seq_len, args.seed)
    if kind != "causal-lm":
        raise SlmError(f"{student} is a {kind} model; LM distillation trains causal LMs")
    if student_layers:
        keep_layers(net, student_layers)
    layer_map = _check_pair(t.model, net, hidden_weight, attention_weight, lm=True)
    data_dir = prepare_corpus(data, t.tokenizer, progress=progress)
    train_data, val_data = PackedTokens.open(data_dir, "train"), PackedTokens.open(data_dir, "val")
    objective = kd_objective(t.model, temperature=temperature, alpha=alpha, hidden_weight=hidden_weight,
                             attention_weight=attention_weight, layer_map=layer_map, lm=True)
    summary = train(net, t.tokenizer, train_data, val_data, objective, args, run_dir, resume=resume,
                    config={"workflow": "distill", "task": "lm", "teacher": teacher, "student": student,
                            "data": data}, progress=progress)
    return {**summary, "teacher": teacher, "student": student, "run_dir": str(run_dir),
            "student_parameters": net.num_parameters(), "teacher_parameters": t.model.num_parameters(),
            "val_ppl": math.exp(min(summary["val_loss"], 50))}


def report(r: dict, args: dict, out) -> None:
    """Print what `slm distill` reports."""
    task = args["task"]
    length_adaptive = args["length_adaptive"]
    out.print(f"teacher {r['teacher_parameters']:,} parameters, student {r['student_parameters']:,}")
    if task == "lm":
        out.print(f"student validation perplexity {r['val_ppl']:.2f}; model in {r['run_dir']}/model")
        return
    out.print(f"test accuracy: teacher {r['teacher_test_accuracy']:.3f}" +
              (f", student {r['student_test_accuracy']:.3f}" if "student_test_accuracy" in r else ""))
    if length_adaptive:
        _report_lad(r, out)
    out.print(f"results -> {r['run_dir']}/distill.json")


def _report_lad(r: dict, out) -> None:
    from rich.table import Table

    table = Table("student", "unpruned acc", "pruned acc", "drop (points)", "FLOPs ratio", "CPU speedup",
                  "mean drop, configs at <= 1/2 FLOPs", title=f"test split; chosen length configuration "
                  f"{r['chosen_lengths']}")
    for name in ("lad", "kd"):
        if name in r:
            m = r[name]
            half = f"{m['mean_drop_points_at_half_flops']:.1f} ({m['configs_at_half_flops']} configs)" \
                if "mean_drop_points_at_half_flops" in m else "-"
            table.add_row("LAD" if name == "lad" else "KD without LAD", f"{m['full']['accuracy']:.3f}",
                          f"{m['pruned']['accuracy']:.3f}", f"{m['accuracy_drop_points']:.1f}",
                          f"{m['flops_ratio']:.2f}x", f"{m['speedup']:.2f}x", half)
    out.print(table)
    out.print(f"model (with length_config.json) -> {r['student_model']}; frontier -> {r['run_dir']}/frontier.png")
