"""YAML recipes: a workflow name plus its keyword arguments, checked against the workflow's signature.

    workflow: pretrain          # the name of a workflow function in slmkit.workflows.WORKFLOWS
    model: tinyllama-nano       # keyword arguments of slmkit.methods.pretrain.pretrain
    train:                      # fields of the workflow's training dataclass (TrainArgs, FinetuneArgs)
      steps: 600

`slm run RECIPE.yaml [--set train.steps=10 ...]` runs one. Unknown keys and wrong types are reported with
the file and key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

from slmkit.errors import SlmError
from slmkit.workflows import HIDDEN, Workflow, by_recipe_name, train_group


def _check_type(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, __import__("types").UnionType) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return value
        if option is Path and isinstance(value, str):
            return Path(value)
        if option is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML reads 3e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if typing.get_origin(option) in (tuple, list) and isinstance(value, list):  # tuple[float, ...], list[str]
            item = typing.get_args(option)[0]
            return typing.get_origin(option)(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if isinstance(option, type) and isinstance(value, option) and not (option is int and isinstance(value, bool)):
            return value
    raise SlmError(f"{where}: expected {annotation}, got {value!r}")


def parse_recipe(recipe: dict, where: str) -> tuple[Workflow, dict]:
    """Validate a recipe dict; return (the workflow, its keyword arguments)."""
    table = by_recipe_name()
    name = recipe.get("workflow")
    if name not in table:
        raise SlmError(f"{where}: 'workflow' must be one of {', '.join(table)} (got {name!r})")
    workflow = table[name]
    args_cls = train_group(workflow)
    hints = typing.get_type_hints(workflow.fn)
    params = inspect.signature(workflow.fn).parameters
    kwargs = {}
    for key, value in recipe.items():
        if key in ("workflow", "description"):
            continue
        if key == "train" and args_cls is not None:
            if not isinstance(value, dict):
                raise SlmError(f"{where}: 'train' must be a mapping of {args_cls.__name__} fields")
            fields = {f.name for f in dataclasses.fields(args_cls)}
            field_hints = typing.get_type_hints(args_cls)
            unknown = sorted(set(value) - fields)
            if unknown:
                raise SlmError(f"{where}: train.{unknown[0]} is not a {args_cls.__name__} field")
            checked = {k: _check_type(v, field_hints[k], f"{where}: train.{k}") for k, v in value.items()}
            kwargs["train_args"] = args_cls(**checked).validate()
            continue
        if key not in params or key in HIDDEN + workflow.internal:
            raise SlmError(f"{where}: '{key}' is not an argument of the {name} workflow")
        kwargs[key] = _check_type(value, hints[key], f"{where}: {key}")
    return workflow, kwargs


def load_recipe(path: Path, overrides: list[str] | None = None):
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SlmError(f"recipe not found: {path}")
    from slmkit.data.records import read_text

    try:
        recipe = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise SlmError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(recipe, dict):
        raise SlmError(f"{path}: a recipe is a mapping with a 'workflow' key")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SlmError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=10")
        value = yaml.safe_load(raw)
        target = recipe
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    return parse_recipe(recipe, str(path))
