"""The `slm` application object, its consoles and the options hand-written commands share."""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from slmkit.workflows import GROUPS, SHARED, WORKFLOWS, summary

out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width


class WorkflowGroup(TyperGroup):
    """A command group that also holds its workflows' commands, each built from its function when it runs or
    shows its help: `slm flan eval` imports only FLAN's modules, and a listing (`slm --help`) shows each
    workflow's summary read from its source, importing none."""

    listing = False

    def workflows(self) -> dict:
        group = self.name if self.name in GROUPS else ""
        return {w.command.rpartition(" ")[2]: w for w in WORKFLOWS if w.command.rpartition(" ")[0] == group}

    def list_commands(self, ctx) -> list[str]:
        return [*self.commands, *(name for name in self.workflows() if name not in self.commands)]

    def parse_args(self, ctx, args):
        if ctx.parent is None:  # the command line as typed, for a run's record of how to rerun or resume it
            ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False

    def get_command(self, ctx, name: str):
        workflow = self.workflows().get(name)
        if workflow is not None and name not in self.commands and self.listing:
            return TyperCommand(name, help=summary(workflow))
        if workflow is not None and name not in self.commands:
            from typer.main import get_command_from_info
            from typer.models import CommandInfo

            from slmkit.cli.commands import workflow_command

            info = CommandInfo(name=name, callback=workflow_command(workflow, out))
            self.commands[name] = get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode="rich")
        return super().get_command(ctx, name)


app = typer.Typer(cls=WorkflowGroup, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="slmkit: build, adapt, combine, evaluate and ship small language models.")
groups: dict[str, typer.Typer] = {}
for _name, _help in GROUPS.items():
    groups[_name] = typer.Typer(cls=WorkflowGroup, no_args_is_help=True, help=_help)
    app.add_typer(groups[_name], name=_name)


def command(name: str, **kwargs):
    """`@command("flan list")` registers a hand-written command, in its group when the name has two words."""
    group, _, sub = name.rpartition(" ")
    return (groups[group] if group else app).command(sub, **kwargs)


ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help=SHARED["model"][1])]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 where the CPU has bf16 units), fp32, bf16, fp16, or int8 "
                                       "(torch engine: int8 weights, bf16 activations).")]
EngineOpt = Annotated[str, typer.Option(help="torch, llamacpp (a GGUF in llama.cpp; other models are exported "
                                        "once, cached), vllm (CUDA), or auto: vllm on a GPU, llama.cpp when "
                                        "installed and the model has a GGUF, else torch.")]
UnsafeOpt = Annotated[bool, typer.Option("--unsafe-no-sandbox", help=SHARED["unsandboxed"][1])]
DataArg = Annotated[str, typer.Argument(help="A packaged corpus (`slm data list`), a .txt/.jsonl file or directory, "
                                        "or a saved HF datasets directory.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory.")]
