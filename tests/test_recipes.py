"""Every YAML recipe validates against its workflow's signature; a nano recipe runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmkit import zoo
from slmkit.errors import SlmError
from slmkit.recipes import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist_for_every_pretraining_family():
    names = {p.stem for p in RECIPES}
    for family in ("tinyllama", "litellama", "phi", "roberta"):
        assert any(n.startswith(family) and "nano" in n for n in names), family
        assert any(n.startswith(family) and "nano" not in n for n in names), family


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    fn, kwargs = load_recipe(path)
    model = kwargs.get("model")
    if model and zoo.is_zoo_name(model) and path.stem.startswith(zoo.get(model).family.lower()):
        assert zoo.get(model).nano == ("nano" in path.stem)  # nano family recipes use nano specs, real ones real


@pytest.mark.parametrize("recipe, message", [
    ({"workflow": "pretrian"}, "'workflow' must be one of"),
    ({"workflow": "pretrain", "modle": "x"}, "'modle' is not an argument"),
    ({"workflow": "pretrain", "train": {"stepz": 3}}, "train.stepz is not a TrainArgs field"),
    ({"workflow": "pretrain", "train": {"steps": "many"}}, "train.steps: expected"),
    ({"workflow": "finetune", "lora": "yes"}, "lora: expected"),
])
def test_bad_recipes_are_named(recipe, message):
    with pytest.raises(SlmError, match=message):
        parse_recipe(recipe, "bad.yaml")


def test_overrides_accept_numbers_yaml_reads_as_strings():
    _, kwargs = load_recipe(RECIPES[0].parent / "tinyllama-nano.yaml", ["train.lr=3e-5", "train.steps=7"])
    assert kwargs["train_args"].lr == 3e-5 and kwargs["train_args"].steps == 7
    with pytest.raises(SlmError, match="train.lr: expected"):
        load_recipe(RECIPES[0].parent / "tinyllama-nano.yaml", ["train.lr=fast"])


def test_nano_recipe_runs_through_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "run", str(RECIPES[0].parent / "tinyllama-nano.yaml"),
                        "--set", "data=python-docs", "--set", "tokenizer=bpe:1024", "--set", f"runs_dir={tmp_path}",
                        "--set", "train.steps=4", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
                        "--set", "train.eval_batches=1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["run_dir"].endswith("tinyllama-nano") and (tmp_path / "tinyllama-nano" / "model").is_dir()
