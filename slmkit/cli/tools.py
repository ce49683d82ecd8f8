"""`slm run`: a YAML recipe runs the workflow it names, with the same checks and report as its command."""

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from slmkit.cli.app import app, out


@app.command("run")
def run_recipe(
    ctx: typer.Context,
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (see recipes/).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a value: KEY=VALUE, e.g. "
                                                   "train.steps=10 or data=my.jsonl (repeatable).")] = None,
    check: Annotated[bool, typer.Option(help="Only validate the recipe.")] = False,
):
    """Run a YAML recipe: a workflow (any `slm` workflow command, e.g. pretrain, flan_eval) with its arguments,
    validated before it starts; prints the workflow's report, then its result as JSON."""
    from slmkit.recipes import load_recipe
    from slmkit.workflows import run

    workflow, kwargs = load_recipe(recipe, set_)
    if check:
        out.print(f"{recipe}: valid {workflow.recipe_name} recipe")
        return
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch, one process reports
    summary = run(workflow, kwargs, out if rank0 else None, argv=ctx.meta.get("argv"),
                  resume_args=["--set", "resume=true"])
    if rank0:
        out.print_json(json.dumps(summary, default=str))
