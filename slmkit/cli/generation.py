"""The commands that talk to a model as it runs: generate, chat, EFT decoding, serve, the quickstart.
They stream to the terminal or serve HTTP, so they are written by hand rather than derived from a workflow."""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from slmkit.api import Limits as ServeLimits
from slmkit.cli.app import DtypeOpt, EngineOpt, ModelOpt, app, err, out
from slmkit.cli.commands import dataclass_options
from slmkit.data.records import read_prompts
from slmkit.errors import SlmError
from slmkit.generate import SamplingParams
from slmkit.train import RUNS_DIR

RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Runs the dashboard at /runs shows.")]

# --- generate / chat -------------------------------------------------------------------------------------


PromptArg = Annotated[str | None, typer.Argument(help="The prompt; '-' or none reads stdin.")]
BetaOpt = Annotated[float, typer.Option(help="EFT strength: 1 = up-scaling, >1 amplifies the fine-tuning, "
                                        "0 = the large base alone.")]
SpeculativeOpt = Annotated[int, typer.Option(help="EFT speculative decoding: the small fine-tuned model drafts this "
                                             "many tokens per round (greedy, one prompt; 0 = off).")]


@dataclass
class PromptArgs:
    """Where prompts come from and how replies are printed: the options `generate` and `eft` share."""

    input: Path | None = field(default=None, metadata={"flags": ("--input", "-i"), "help": "JSONL file of prompts "
                               "({\"prompt\": ...} or {\"messages\": [...]}), run in batches."})
    batch_size: int = field(default=8, metadata={"help": "Prompts decoded together from --input."})
    system: str | None = field(default=None, metadata={
        "help": "System prompt for chat models (default: \"You are a helpful assistant.\")."})
    chat: bool | None = field(default=None, metadata={"flags": ("--chat/--no-chat",), "help": "Apply the chat "
                              "template (default: when the model has one)."})
    json: bool = field(default=False, metadata={"help": "One JSON object per prompt on stdout."})


@app.command()
@dataclass_options(PromptArgs, "io")
@dataclass_options(SamplingParams, "sampling")
def generate(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    engine: EngineOpt = "auto",
    eft_ft: Annotated[str | None, typer.Option(help="Emulated fine-tuning: a small fine-tuned model whose "
                                               "fine-tuning is added to --model (see `slm eft`).")] = None,
    eft_base: Annotated[str | None, typer.Option(help="EFT: the small fine-tuned model's base.")] = None,
    beta: BetaOpt = 1.0,
    speculative: SpeculativeOpt = 0,
    io: PromptArgs = None,
    sampling: SamplingParams = None,
):
    """Generate text: streamed to the terminal, or as JSON lines for scripts."""
    if (eft_ft is None) != (eft_base is None):
        raise SlmError("EFT needs both --eft-ft and --eft-base")
    if eft_ft is not None:
        return run_eft(prompt, model, eft_ft, eft_base, beta, speculative, dtype, io, sampling)
    from slmkit.engines import open_model

    prompts = read_prompts(prompt, io.input)
    sampling.validate()
    print_generations(open_model(model, engine, dtype=dtype), prompts, sampling, io)


def print_generations(loaded, prompts, sampling, io: PromptArgs, decode=None, batch_size: int | None = None):
    from slmkit import generate as g

    if len(prompts) == 1 and not io.json:
        stream_to_terminal(loaded, prompts[0], sampling, system=io.system, chat=io.chat, decode=decode)
        return
    batch_size = batch_size or io.batch_size
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for c in g.generate(loaded, batch, sampling, system=io.system, chat=io.chat, decode=decode):
            if io.json:
                sys.stdout.write(json.dumps({"prompt": c.prompt, "text": c.text, "prompt_tokens": c.prompt_tokens,
                                             "completion_tokens": c.completion_tokens,
                                             "finish_reason": c.finish_reason}) + "\n")
                sys.stdout.flush()
            else:
                out.rule()
                out.print(c.text, markup=False, highlight=False)


def run_eft(prompt, large, small_ft, small_base, beta, speculative, dtype, io: PromptArgs, sampling):
    from slmkit.methods import eft

    prompts = read_prompts(prompt, io.input)
    sampling.validate()
    models = eft.load_eft(large, small_ft, small_base, dtype=dtype)
    print_generations(models.small_ft, prompts, sampling, io, decode=eft.decoder(models, beta, speculative),
                      batch_size=1 if speculative else None)


@app.command("eft")
@dataclass_options(PromptArgs, "io")
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
    dtype: DtypeOpt = "auto",
    io: PromptArgs = None,
    sampling: SamplingParams = None,
):
    """Emulated fine-tuning / LM up-scaling: sample from log p_large + β·(log p_small_ft − log p_small_base)
    per token. No training; the three models must share a vocabulary (checked). Local models only: an endpoint
    does not return the full next-token distribution EFT needs."""
    run_eft(prompt, large, small_ft, small_base, beta, speculative, dtype, io, sampling)


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
    from slmkit.generate import check_images, fit_history, is_chat_model

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
        history, dropped = fit_history(loaded, history, sampling.max_new_tokens, system)
        if dropped:
            err.print(f"[dim]({dropped} oldest exchange(s) dropped to fit the context)[/]")
        reply = stream_to_terminal(loaded, with_images(history), sampling, system=system, chat=True,
                                   interruptible=True, images=images or None)
        history.append({"role": "assistant", "content": reply})


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
    runs_dir: RunsDirOpt = RUNS_DIR,
    limits: ServeLimits = None,
):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (both stream with "stream": true),
    /v1/models, /health. Concurrent requests are batched. Use it with any OpenAI client:
    `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")`, or as a teacher: `http://127.0.0.1:8000/v1#NAME`.
    In a browser: a chat playground at /, the runs dashboard at /runs."""
    from slmkit.serve import serve as run_server

    def ready(server):
        from slmkit.batching import SerialEngine

        how = "one request at a time" if isinstance(server.engine, SerialEngine) else f"max batch {max_batch}"
        err.print(f"serving [bold]{server.name}[/] at {server.url} ({server.engine_name} engine, {how}); "
                  "Ctrl-C stops")
        err.print(f"in a browser: playground {server.url.removesuffix('/v1')}/, runs "
                  f"{server.url.removesuffix('/v1')}/runs")

    run_server(model, host=host, port=port, max_batch=max_batch, served_name=served_name, api_key=api_key,
               limits=limits, dtype=dtype, engine=engine, runs_dir=runs_dir, on_ready=ready)
    err.print("stopped")


@app.command()
def dashboard(
    runs_dir: Annotated[Path, typer.Argument(help="The runs directory to show.")] = RUNS_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for all interfaces).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="SLMKIT_API_KEY", help="Require this bearer token.")] = None,
):
    """The runs dashboard without a model: every run under RUNS_DIR with its workflow, state, step and ETA; a run's
    loss curves drawn as they grow, its config, results and how to resume it; several runs' curves overlaid."""
    from slmkit.serve import serve as run_server

    def ready(server):
        err.print(f"runs dashboard for {runs_dir} at {server.url.removesuffix('/v1')}/runs; Ctrl-C stops")
        if not runs_dir.is_dir():
            err.print(f"{runs_dir} does not exist yet: runs appear as workflows write them there")

    run_server(host=host, port=port, api_key=api_key, runs_dir=runs_dir, dashboard=True, on_ready=ready)
    err.print("stopped")


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
    out.print(z.rich_table(z.table_rows()))
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
