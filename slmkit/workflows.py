"""The workflows: every library function `slm` runs as a command and a recipe runs by name.

Each entry names a typed library function; its signature is the one place its arguments and defaults are
written, and its docstring's `Args:` section is their help. `slmkit.cli` turns each entry into a command
(`slm flan eval --held-out logic`), `slmkit.recipes` into a YAML recipe (`workflow: flan_eval`), and the
entry's `report` prints the result table after either. To add a workflow: write the function (typed, with
`Args:`), a report beside it, and one line below.

Parameters many workflows share (model, run name, runs directory, resume, LoRA, sandbox) take their flag and
help from `SHARED`, so a command's `--name` means the same everywhere; a docstring may still say more. Arguments
the workflows of one module share (FLAN's mixing options, Orca's teacher settings) are documented once in that
module's `HELP` dict.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import SlmError


@dataclass(frozen=True)
class Workflow:
    command: str  # "flan eval": a group and a name, or one name
    function: str  # "module:function", imported when the command runs or its help is shown
    report: str | None = None  # "module:function" printing the result: report(result, arguments, console)
    flags: dict[str, str | tuple[str, ...]] = field(default_factory=dict)  # parameter -> flag(s), where not
    #   --parameter-name
    arguments: tuple[str, ...] = ()  # parameters given positionally on the command line
    train_defaults: str | None = None  # "module:DICT": this workflow's defaults for its training arguments
    internal: tuple[str, ...] = ()  # parameters for library callers only (e.g. a loss function)

    @property
    def fn(self):
        return resolve(self.function)

    @property
    def recipe_name(self) -> str:  # `workflow:` in a recipe: the function's name
        return self.function.rpartition(":")[2]


# Subcommand groups and their one-line help.
GROUPS = {
    "flan": "FLAN / Flan-T5 instruction tuning: build mixtures, train, evaluate on held-out task clusters.",
    "orca": "Orca 2 explanation tuning: strategy answers from a teacher, students trained with prompt erasure.",
    "gsm": "TinyGSM: math word problems with Python solutions, a sandbox, a verifier and best-of-N.",
    "flame": "FLAME: a small model for spreadsheet formulas.",
    "slade": "SLaDe: a small decompiler from optimised assembly to C.",
    "llava": "LLaVA-ϕ: a small vision-language assistant.",
    "data": "Corpora: list the packaged ones, tokenise, filter, synthesize.",
    "tokenizer": "Tokenizers: train a byte-level BPE on a corpus.",
}

M = "slmkit.methods."
FLAN = M + "flan.workflows:"
D = "slmkit.domains."
WORKFLOWS = [
    Workflow("zoo", "slmkit.zoo:zoo", "slmkit.zoo:report", arguments=("name",)),
    # building and adapting
    Workflow("pretrain", M + "pretrain:pretrain", M + "pretrain:report"),
    Workflow("finetune", M + "finetune:finetune", M + "finetune:report", internal=("objective",)),
    Workflow("ul2r", M + "ul2r:ul2r", M + "ul2r:report"),
    Workflow("distill", M + "distill:distill", M + "distill:report"),
    Workflow("prune-search", M + "length_adaptive:prune_search", M + "length_adaptive:report_search",
             arguments=("model",)),
    Workflow("classify", M + "length_adaptive:classify", M + "length_adaptive:report_labels",
             arguments=("model", "texts")),
    Workflow("pet", M + "pet.workflow:pet", M + "pet.workflow:report"),
    # combining a large and a small model
    Workflow("eft-eval", M + "eft:eft_eval", M + "eft:report", flags={"large_base": "--large", "out_dir": "--out"}),
    Workflow("supericl", M + "supericl:supericl", M + "supericl:report", flags={"out_dir": "--out"}),
    # evaluating and shipping
    Workflow("eval", "slmkit.evaluate:evaluate_model", "slmkit.evaluate:report", flags={"text": "--perplexity"},
             arguments=("model",)),
    Workflow("export", "slmkit.export:export", "slmkit.export:report", arguments=("model",)),
    Workflow("proofs", "slmkit.proofs:proof_status", "slmkit.proofs:report"),
    # data
    Workflow("data list", "slmkit.data.corpora:list_corpora", "slmkit.data.corpora:report"),
    Workflow("data prepare", "slmkit.data.prepare:prepare_data", "slmkit.data.prepare:report", arguments=("data",)),
    Workflow("tokenizer train", "slmkit.data.tokenizers:tokenizer_train", "slmkit.data.tokenizers:report",
             arguments=("data",)),
    Workflow("data filter", "slmkit.data.quality:filter_corpus", "slmkit.data.quality:report",
             arguments=("data",)),
    Workflow("data synthesize", "slmkit.data.synthesize:synthesize", "slmkit.data.synthesize:report",
             flags={"kinds": "--kind"}, arguments=("topics",)),
    # FLAN, Orca 2, TinyGSM
    Workflow("flan list", FLAN + "flan_list", FLAN + "report_list"),
    Workflow("flan build", FLAN + "flan_build", FLAN + "report_build", flags={"clusters": "--cluster"}),
    Workflow("flan train", FLAN + "flan_train", FLAN + "report_train", flags={"clusters": "--cluster"}),
    Workflow("flan eval", FLAN + "flan_eval", FLAN + "report_eval"),
    Workflow("flan proof", M + "flan.heldout:flan_proof", M + "flan.heldout:report",
             flags={"held_out": "--held-out"}, train_defaults=M + "flan.heldout:PROOF_TRAIN"),
    Workflow("orca data", M + "orca:orca_data", M + "orca:report_data",
             flags={"tasks": "--task", "strategies": "--strategy"}),
    Workflow("orca train", M + "orca:orca_train", M + "orca:report_train"),
    Workflow("orca eval", M + "orca:orca_eval", M + "orca:report_eval", flags={"tasks": "--task"}),
    Workflow("gsm data", M + "tinygsm.data:gsm_data", M + "tinygsm.data:report"),
    Workflow("gsm train", M + "tinygsm.generator:gsm_train", M + "tinygsm.generator:report"),
    Workflow("gsm solve", M + "tinygsm.generator:gsm_solve", M + "tinygsm.generator:report_solve",
             flags={"samples": ("--samples", "-n")}, arguments=("question",)),
    Workflow("gsm verify-train", M + "tinygsm.verifier:verify_train", M + "tinygsm.verifier:report"),
    Workflow("gsm eval", M + "tinygsm.evaluate:gsm_eval", M + "tinygsm.evaluate:report"),
    # domain models
    Workflow("flame data", D + "flame.corpus:flame_data", D + "flame.corpus:report"),
    Workflow("flame train", D + "flame.model:flame_train", D + "flame.model:report_train"),
    Workflow("flame eval", D + "flame.model:flame_eval", D + "flame.model:report_eval"),
    Workflow("flame repair", D + "flame.model:repair", D + "flame.model:report_pairs", arguments=("broken",)),
    Workflow("flame complete", D + "flame.model:complete", D + "flame.model:report_pairs", arguments=("prefixes",)),
    Workflow("flame search", D + "flame.model:search", D + "flame.model:report_search", arguments=("query",)),
    Workflow("slade data", D + "slade.corpus:slade_data", D + "slade.corpus:report",
             flags={"arches": "--arch", "c_files": "--c-file"}),
    Workflow("slade train", D + "slade.model:slade_train", D + "slade.model:report_train"),
    Workflow("slade eval", D + "slade.model:slade_eval", D + "slade.model:report_eval"),
    Workflow("slade decompile", D + "slade.model:decompile", D + "slade.model:report_decompile",
             arguments=("asm_file",)),
    Workflow("llava data", D + "llava_phi.scenes:llava_data", D + "llava_phi.scenes:report"),
    Workflow("llava vision-pretrain", D + "llava_phi.tower:vision_pretrain", D + "llava_phi.tower:report",
             train_defaults=D + "llava_phi.tower:CLIP_TRAIN"),
    Workflow("llava assemble", D + "llava_phi.model:assemble", D + "llava_phi.model:report",
             flags={"feature_layers": "--feature-layer", "lm_layers": "--lm-layer"}),
    Workflow("llava train", D + "llava_phi.train:llava_train", D + "llava_phi.train:report"),
    Workflow("llava eval", D + "llava_phi.evaluate:llava_eval", D + "llava_phi.evaluate:report_eval"),
    Workflow("llava probe", D + "llava_phi.evaluate:probe_tower", D + "llava_phi.evaluate:report_probe"),
]

# Parameters shared by many workflows: (flag, help). A workflow's docstring may give a more specific help.
SHARED = {
    "model": ("--model", "Zoo name, model directory, .gguf file or hub id. Default: the embedded SmolLM2-135M."),
    "run": ("--name", "Run name: output goes to RUNS_DIR/NAME."),
    "runs_dir": ("--runs-dir", "Where runs are written."),
    "resume": ("--resume", "Continue the run from its latest checkpoint."),
    "lora": ("--lora/--full", "LoRA adapters or full fine-tuning."),
    "tasks_file": ("--tasks", "Your tasks/templates YAML (same shape as slmkit/data/flan/tasks.yaml), added to "
                   "the packaged ones."),
    "unsandboxed": ("--unsafe-no-sandbox", "Run model-written code without bubblewrap (resource limits only). "
                    "Only for code you trust."),
    "seed": ("--seed", "Seed: the same seed gives the same data, split and sampling."),
    "engine": ("--engine", "What samples: torch, llamacpp (a GGUF; a model directory is exported to q8_0 once, "
               "several times faster on a CPU), vllm (CUDA) or auto."),
}
SHORT_FLAGS = {"--model": "-m"}
HIDDEN = ("progress", "train_args")  # filled in by the caller: a progress bar, the training-argument group


def resolve(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def by_command() -> dict[str, Workflow]:
    return {w.command: w for w in WORKFLOWS}


def by_recipe_name() -> dict[str, Workflow]:
    return {w.recipe_name: w for w in WORKFLOWS}


@functools.cache
def split_docstring(fn) -> tuple[str, dict[str, str]]:
    """(description, {parameter: help}) from a Google-style docstring: an `Args:` section of `name: text`
    lines, continued by deeper-indented lines."""
    doc = inspect.getdoc(fn) or ""
    description, _, args = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        if not line.strip():
            break
        m = re.match(r"    (\w+): (.*)", line)
        if m:
            name, helps[m[1]] = m[1], m[2].strip()
        elif name and line.startswith("      "):
            helps[name] += " " + line.strip()
        else:
            break
    return description.strip(), helps


def summary(workflow: Workflow) -> str:
    """The first paragraph of the workflow function's docstring, read from its source text without importing
    the module: listing the commands (`slm --help`) then loads neither numpy nor any method module. (A test
    checks it equals the imported function's.)"""
    module, _, name = workflow.function.partition(":")
    path = Path(__file__).parent.parent / module.replace(".", "/")
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    source = path.read_text(encoding="utf-8")
    body = source[re.search(rf"^def {name}\(", source, flags=re.M).end():]
    docstring = body[body.index('"""') + 3:]
    docstring = docstring[:docstring.index('"""')]
    return paragraphs(inspect.cleandoc(docstring))[0]


def paragraphs(text: str) -> list[str]:
    """A docstring's paragraphs, each on one line (the terminal wraps them)."""
    return [" ".join(paragraph.split()) for paragraph in text.split("\n\n")]


@dataclass
class Parameter:
    name: str
    annotation: object
    default: object  # inspect.Parameter.empty when required
    flags: tuple[str, ...]  # the first is the long one
    help: str


def parameters(workflow: Workflow) -> list[Parameter]:
    """The workflow's command-line parameters in signature order, with flag and help (from the docstring, or
    SHARED). A parameter without help is an error: every flag is documented."""
    fn = workflow.fn
    hints = typing.get_type_hints(fn)
    _, helps = split_docstring(fn)
    module_help = getattr(inspect.getmodule(fn), "HELP", {})  # arguments several workflows of a module share
    trains = train_group(workflow) is not None
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in HIDDEN + workflow.internal or (p.name == "seed" and trains):
            continue  # the training group's --seed is the workflow's seed
        flags = workflow.flags.get(p.name) or SHARED.get(p.name, ("--" + p.name.replace("_", "-"),))[0]
        flags = (flags,) if isinstance(flags, str) else flags
        flags += (SHORT_FLAGS[flags[0]],) if flags[0] in SHORT_FLAGS else ()
        help_ = helps.get(p.name) or module_help.get(p.name) or SHARED.get(p.name, (None, ""))[1]
        if not help_:
            raise SlmError(f"{workflow.function}: parameter '{p.name}' has no help (add it to the docstring's Args)")
        if p.name not in hints:
            raise SlmError(f"{workflow.function}: parameter '{p.name}' has no type annotation")
        params.append(Parameter(p.name, hints[p.name], p.default, flags, help_))
    return params


def train_group(workflow: Workflow):
    """The dataclass of the workflow's training arguments (TrainArgs, FinetuneArgs), or None."""
    hint = typing.get_type_hints(workflow.fn).get("train_args")
    if hint is None:
        return None
    return next(a for a in typing.get_args(hint) or (hint,) if a is not type(None))


def run(workflow: Workflow, kwargs: dict, console=None, *, argv: list[str] | None = None,
        resume_args: list[str] | None = None) -> dict:
    """Call the workflow (its training group's seed is also its own `seed`), then print its report.

    A workflow that writes a run directory (it takes `run` and `runs_dir`, or `out_dir`) has its start and end
    recorded there (`runs.record_workflow`): the command line `argv` it was given, whether `argv + resume_args`
    resumes it, and the source commit.
    """
    from slmkit.runs import record_workflow, source_version

    signature = inspect.signature(workflow.fn)
    train_args = kwargs.get("train_args")
    if train_args is not None and "seed" in signature.parameters and "seed" not in kwargs:
        kwargs = {**kwargs, "seed": train_args.seed}
    bound = signature.bind(**kwargs)
    bound.apply_defaults()
    run_dir = None  # the run directory the workflow writes: RUNS_DIR/RUN, or its OUT_DIR (eft-eval, supericl)
    if {"run", "runs_dir"} <= set(signature.parameters):
        run_dir = Path(bound.arguments["runs_dir"]) / bound.arguments["run"]
    elif "out_dir" in signature.parameters:
        run_dir = Path(bound.arguments["out_dir"])
    if run_dir is not None:
        resumable = "resume" in signature.parameters
        record_workflow(run_dir, {"event": "start", "command": workflow.command, "argv": argv,
                                  "resume_args": resume_args if resumable else None, "source": source_version()})
    try:
        result = workflow.fn(**kwargs)
    except BaseException as e:
        if run_dir is not None:
            interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
            record_workflow(run_dir, {"event": "end", "state": "interrupted" if interrupted else "failed",
                                      "error": None if interrupted else f"{type(e).__name__}: {e}"[:2000]})
        raise
    if run_dir is not None:
        record_workflow(run_dir, {"event": "end", "state": "finished"})
    if console is not None and workflow.report:
        resolve(workflow.report)(result, bound.arguments, console)
    return result
