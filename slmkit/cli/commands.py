"""How a workflow becomes a command: its typed parameters become options (or arguments), their help comes
from the docstring's `Args:`, a training-argument dataclass becomes a group of options, and the workflow's
report prints the result."""

import dataclasses
import functools
import inspect
import json
import sys
import typing
from typing import Annotated

import typer

from slmkit.errors import SlmError
from slmkit.workflows import Workflow, paragraphs, parameters, resolve, run, split_docstring, train_group


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
            flags = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))
            option = typer.Option(*flags, help=f.metadata.get("help", ""))
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


def _is_tuple(annotation) -> bool:
    return any(typing.get_origin(a) is tuple for a in (annotation, *typing.get_args(annotation)))


def _split(value: str, annotation, flag: str) -> tuple:
    """A tuple parameter is one comma-separated option: --betas 0,0.5,1."""
    item = next(typing.get_args(a)[0] for a in (annotation, *typing.get_args(annotation))
                if typing.get_origin(a) is tuple)
    try:
        return tuple(item(v) for v in value.split(",")) if value.strip() else ()  # an empty default: none
    except ValueError as e:
        raise SlmError(f"{flag}: expected comma-separated {item.__name__} values, got {value!r}") from e


def _plain(value):
    """JSON for what a workflow returns besides dicts and lists: dataclasses, paths."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def workflow_command(workflow: Workflow, console):
    """The Typer command function for one workflow."""
    params = parameters(workflow)
    signature = []
    for p in params:
        annotation = p.annotation
        help_ = p.help
        if _is_tuple(annotation):
            annotation = str | None if type(None) in typing.get_args(annotation) else str
            help_ += " Comma-separated."
        if p.name in workflow.arguments:
            info = typer.Argument(help=help_)
        else:
            info = typer.Option(*p.flags, help=help_)
        default = ... if p.default is inspect.Parameter.empty else p.default
        if _is_tuple(p.annotation) and isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        signature.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                           annotation=Annotated[annotation, info]))
    signature.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object instead of the report.")]))
    signature.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    tuples = {p.name: p for p in params if _is_tuple(p.annotation)}

    def command(as_json: bool, ctx: typer.Context, **kwargs):
        for name, p in tuples.items():
            if isinstance(kwargs[name], str):
                kwargs[name] = _split(kwargs[name], p.annotation, p.flags[0])
        result = run(workflow, kwargs, None if as_json else console, argv=ctx.meta.get("argv"),
                     resume_args=["--resume"])
        if as_json:
            sys.stdout.write(json.dumps(result, default=_plain) + "\n")

    command.__signature__ = inspect.Signature(signature)
    command.__doc__ = "\n\n".join(paragraphs(split_docstring(workflow.fn)[0]))
    command.__name__ = workflow.recipe_name
    group = train_group(workflow)
    if group is not None:
        defaults = resolve(workflow.train_defaults) if workflow.train_defaults else {}
        command = dataclass_options(group, "train_args", **defaults)(command)
    return command
