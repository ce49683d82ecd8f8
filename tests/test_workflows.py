"""The workflow registry: every command and recipe comes from one typed function, so a default, a flag's help and
a recipe key exist in one place."""

import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.cli.commands import workflow_command
from slmkit.errors import SlmError
from slmkit.recipes import parse_recipe
from slmkit.workflows import HIDDEN, WORKFLOWS, parameters, split_docstring, summary, train_group

IDS = [w.command for w in WORKFLOWS]


def _click_command(workflow):
    group = typer.main.get_command(app)
    for word in workflow.command.split():
        group = group.get_command(None, word)
    return group


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=IDS)
def test_each_command_takes_its_defaults_and_help_from_the_function(workflow):
    fn = workflow.fn
    signature = inspect.signature(fn).parameters
    command = _click_command(workflow)
    by_name = {p.name: p for p in command.params}
    _, helps = split_docstring(fn)
    for p in parameters(workflow):
        option = by_name[p.name]
        default = signature[p.name].default
        if default is inspect.Parameter.empty:
            assert option.required, p.name
        elif isinstance(default, tuple):  # a tuple is one comma-separated option
            assert option.default == ",".join(str(v) for v in default)
        else:
            assert option.default == default, p.name
        assert option.help.startswith(helps.get(p.name, p.help)), p.name
    # every argument of the function is an option, the training group's fields included, and nothing else
    expected = {p.name for p in parameters(workflow)}
    group = train_group(workflow)
    if group is not None:
        expected |= {f"train_args__{name}" for name in group.__dataclass_fields__}
    assert set(by_name) == expected | {"as_json"}  # --json: the result as JSON instead of the report
    assert CliRunner().invoke(app, [*workflow.command.split(), "--help"]).exit_code == 0


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=IDS)
def test_a_recipe_takes_every_argument_the_command_does(workflow):
    """The recipe of a workflow accepts each of its command's parameters under the same name, and rejects others."""
    hints = typing.get_type_hints(workflow.fn)
    for p in parameters(workflow):
        if p.default is inspect.Parameter.empty:
            continue
        value = p.default
        if value is None:  # give None-defaulted parameters a value of their type
            kind = next(a for a in typing.get_args(hints[p.name]) if a is not type(None))
            value = {str: "x", int: 1, float: 0.5, bool: True, Path: "x"}.get(kind, ["1"] if typing.get_origin(kind)
                                                                              is list else None)
            if typing.get_origin(kind) is list:
                value = [{str: "x", int: 1, Path: "x"}[typing.get_args(kind)[0]]]
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, tuple):  # YAML has lists
            value = list(value)
        found, kwargs = parse_recipe({"workflow": workflow.recipe_name, p.name: value}, "r.yaml")
        assert found is workflow and p.name in kwargs
    for hidden in HIDDEN + workflow.internal:
        if hidden in inspect.signature(workflow.fn).parameters and hidden != "train_args":
            with pytest.raises(SlmError, match=f"'{hidden}' is not an argument"):
                parse_recipe({"workflow": workflow.recipe_name, hidden: None}, "r.yaml")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=IDS)
def test_the_listing_summary_read_from_source_is_the_docstrings(workflow):
    first = split_docstring(workflow.fn)[0].split("\n\n")[0]
    assert summary(workflow) == " ".join(first.split())


def _all_commands(command, path=()):
    if hasattr(command, "list_commands"):
        for name in command.list_commands(None):
            yield from _all_commands(command.get_command(None, name), (*path, name))
    else:
        yield " ".join(path), command


def test_option_names_mean_one_thing_everywhere():
    """--seed is always an integer, --out always a path, --to a format, --model/-m a model."""
    seen = 0
    for name, command in _all_commands(typer.main.get_command(app)):
        for param in command.params:
            opts = set(param.opts)
            annotation = param.type_descriptor.annotation
            base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
            if "--seed" in opts:
                assert base is int, name
            if "--out" in opts:
                assert base is Path, name
            if "--to" in opts:
                assert base is str, name
            if "--model" in opts:
                assert "-m" in opts, name
            seen += bool(opts & {"--seed", "--out", "--model"})
    assert seen > 40


def test_help_imports_neither_numpy_nor_the_method_modules():
    code = ("import sys\nfrom slmkit.cli import app\nsys.argv = ['slm', '--help']\ntry:\n    app()\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('numpy', 'torch', 'slmkit.methods.pet', "
            "'slmkit.methods.flan') if m in sys.modules), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "[]"
    assert "pretrain" in r.stdout and "supericl" in r.stdout


def test_a_workflow_runs_through_its_command_and_prints_its_report(tmp_path):
    """`slm flan build` (a workflow without a model) writes its file and prints the report beside it."""
    out = tmp_path / "mix.jsonl"
    r = CliRunner().invoke(app, ["flan", "build", "--out", str(out), "--examples", "40", "--cluster", "logic",
                                 "--seed", "3"])
    assert r.exit_code == 0, r.output
    rows = out.read_text().splitlines()
    assert len(rows) == 40 and "wrote 40 examples" in r.output and str(out) in r.output
    from slmkit.methods.flan import flan_build

    again = tmp_path / "again.jsonl"
    flan_build(again, clusters=["logic"], examples=40, seed=3)
    assert again.read_text().splitlines() == rows  # the command is the function with the same defaults


def test_a_tuple_parameter_is_one_comma_separated_option():
    command = workflow_command(next(w for w in WORKFLOWS if w.command == "eft-eval"), None)
    betas = inspect.signature(command).parameters["betas"]
    assert betas.default == "0,0.25,0.5,0.75,1,1.5,2"
    r = CliRunner().invoke(app, ["eft-eval", "--small-ft", "a", "--small-base", "b", "--betas", "0,x"])
    assert r.exit_code == 1 and "--betas: expected comma-separated float values, got '0,x'" in str(r.exception)
