"""Ship a model: GGUF for llama.cpp, ONNX through optimum, and a parity check against the PyTorch model.

No format writer lives here. A GGUF is written by llama.cpp's own converter (`convert_hf_to_gguf.py` with its
`gguf-py`, taken from the llama.cpp that the `llama-cpp-python` source distribution vendors, or from a
checkout named by `SLMKIT_LLAMA_CPP`) and, for k-quants, quantised by llama.cpp's own `llama_model_quantize`
through `llama-cpp-python`. `parity()` then runs the GGUF in llama.cpp beside the PyTorch model: greedy text
agreement and the mean absolute difference of next-token logits over the same tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from slmkit.errors import SlmError

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored converter is fetched when none is installed
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter directly
QUANTS = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15,
          "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}  # llama_ftype values, quantised from an f16 GGUF by llama.cpp
GGUF_TYPES = (*CONVERTER_TYPES, *QUANTS)


def llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:
        return LLAMA_CPP_PYTHON


def converter(progress: bool = True) -> Path:
    """llama.cpp's `convert_hf_to_gguf.py`: from a checkout in $SLMKIT_LLAMA_CPP, else from the cache, else
    extracted (script, `conversion/`, `gguf-py/`) from the llama-cpp-python source distribution on PyPI."""
    from slmkit.models import cache_dir

    if os.environ.get("SLMKIT_LLAMA_CPP"):
        script = Path(os.environ["SLMKIT_LLAMA_CPP"]) / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise SlmError(f"SLMKIT_LLAMA_CPP={os.environ['SLMKIT_LLAMA_CPP']} holds no convert_hf_to_gguf.py")
        return script
    version = llama_cpp_version()
    home = cache_dir() / "llama.cpp" / version
    script = home / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    if progress:
        print(f"fetching llama.cpp's GGUF converter (llama-cpp-python {version} source) into {home}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise SlmError(f"cannot fetch llama.cpp's converter (pip download llama-cpp-python=={version}): {last}; "
                           "or point SLMKIT_LLAMA_CPP at a llama.cpp checkout")
        home.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=home.parent))
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp"):
                    continue
                inner = Path(*parts[3:])
                if inner.name == "convert_hf_to_gguf.py" and len(inner.parts) == 1 or \
                        inner.parts[0] in ("conversion", "gguf-py"):
                    member.name = str(inner)
                    tar.extract(member, staging, filter="data")
    if not (staging / "convert_hf_to_gguf.py").is_file():
        raise SlmError(f"llama-cpp-python {version}'s source holds no convert_hf_to_gguf.py")
    staging.rename(home) if not home.exists() else shutil.rmtree(staging)
    return script


def model_dir(source: str | None) -> tuple[Path, str]:
    """The HF directory (and name) of what the user named: a run's model, a directory, a zoo name of a packaged
    model, a .gguf file (dequantised once by `models.load`)."""
    from slmkit import zoo
    from slmkit.models import convert_gguf, packaged_weights, resolve

    kind, path = resolve(source)
    if kind == "zoo":
        spec = zoo.get(source or zoo.DEFAULT_MODEL)
        if spec.package is None:
            raise SlmError(f"{spec.name} is a random-initialised spec: train it first, then export its run's model")
        path, kind = packaged_weights(spec), "gguf"
    if kind == "gguf":
        path = convert_gguf(path)
    if kind == "hub":
        raise SlmError(f"{source}: export reads a local model directory")
    return Path(path), (source or zoo.DEFAULT_MODEL)


def to_gguf(source: str | None, out: Path | None = None, quant: str = "q8_0", progress: bool = True) -> Path:
    """Write a GGUF of a decoder model with llama.cpp's converter, quantised to `quant` (GGUF_TYPES)."""
    if quant not in GGUF_TYPES:
        raise SlmError(f"unknown GGUF type '{quant}' (one of {', '.join(GGUF_TYPES)})")
    path, name = model_dir(source)
    config = json.loads((path / "config.json").read_text())
    if config.get("is_encoder_decoder"):
        raise SlmError(f"{name} is an encoder-decoder model; llama.cpp's GGUF export here covers decoder LMs")
    out = Path(out or f"{Path(name).name if Path(name).name != 'model' else Path(name).parent.name}-{quant}.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    script = converter(progress)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        first = Path(tmp) / f"model-{quant if quant in CONVERTER_TYPES else 'f16'}.gguf"
        done = subprocess.run([sys.executable, str(script), str(path), "--outfile", str(first), "--outtype",
                               quant if quant in CONVERTER_TYPES else "f16"], capture_output=True, text=True)
        if done.returncode != 0 or not first.is_file():
            errors = [ln for ln in done.stderr.splitlines() if "Error" in ln or "error" in ln] or \
                done.stderr.strip().splitlines() or ["no output"]
            raise SlmError(f"llama.cpp's converter failed on {path}: {errors[-1].strip()}")
        if quant in QUANTS:
            final = Path(tmp) / f"model-{quant}.gguf"
            quantize(first, final, quant)
        else:
            final = first
        os.replace(final, out)  # atomic: a failed export leaves no half-written file
    return out


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's own quantiser (`llama_model_quantize`) through llama-cpp-python."""
    llama_cpp = require_llama_cpp("k-quant GGUF export")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads or os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0 or not dst.is_file():
        raise SlmError(f"llama.cpp could not quantise {src} to {quant}")


def require_llama_cpp(what: str):
    try:
        import llama_cpp
    except ImportError as e:
        raise SlmError(f"{what} needs llama-cpp-python: pip install 'slmkit[cpu-fast]'") from e
    return llama_cpp


def parity(source: str | None, gguf: Path, prompt: str = "The capital of France is", tokens: int = 64,
           progress: bool = True) -> dict:
    """Run the GGUF in llama.cpp beside the PyTorch model (fp32) from the same prompt tokens: how many of
    `tokens` greedy tokens agree (position by position, and before the first difference), and the mean
    |Δlogit| of the next-token logits over the prompt and the PyTorch continuation."""
    import numpy as np
    import torch

    from slmkit.generate import SamplingParams, decode_tokens
    from slmkit.models import load_dir

    llama_cpp = require_llama_cpp("the GGUF parity check")
    path, _ = model_dir(source)
    loaded = load_dir(path, dtype="fp32")
    ids = loaded.tokenizer(prompt).input_ids
    prompt_ids = torch.tensor([ids])  # greedy, no EOS stop: the same number of tokens from both
    greedy = [int(t[0]) for t in decode_tokens(loaded.model, prompt_ids, torch.ones_like(prompt_ids),
                                                SamplingParams(max_new_tokens=tokens), set())]
    seq = torch.tensor([ids + greedy])
    with torch.inference_mode():
        torch_logits = loaded.model(seq).logits[0, :-1].float().numpy()
    torch_tokens = seq[0, len(ids):].tolist()
    llm = llama_cpp.Llama(str(gguf), n_ctx=len(seq[0]) + 8, logits_all=True, verbose=False,
                          n_threads=os.cpu_count() or 1)
    llm.eval(seq[0, :-1].tolist())  # teacher-forced on the PyTorch tokens
    vocab = min(torch_logits.shape[1], llm.n_vocab())
    gguf_logits = np.array(llm.scores[:llm.n_tokens, :vocab])
    delta = float(np.abs(gguf_logits - torch_logits[:, :vocab]).mean())
    llm.reset()
    gguf_tokens = []
    for token in llm.generate(ids, top_k=1, temp=0.0, min_p=0.0, top_p=1.0, repeat_penalty=1.0):
        gguf_tokens.append(token)
        if len(gguf_tokens) == tokens:
            break
    same = [a == b for a, b in zip(torch_tokens, gguf_tokens, strict=False)]
    prefix = same.index(False) if False in same else len(same)
    return {"gguf": str(gguf), "prompt": prompt, "tokens": tokens, "agree": sum(same) / tokens,
            "agree_prefix": prefix, "mean_abs_logit_delta": delta,
            "torch_text": loaded.tokenizer.decode(torch_tokens), "gguf_text": loaded.tokenizer.decode(gguf_tokens)}


def to_onnx(source: str | None, out: Path) -> Path:
    """An ONNX export through optimum's exporter (the `optimum-onnx` package), for architectures it supports.
    optimum-onnx 0.1 pins transformers 4.x, so this runs in an environment with transformers 4 and optimum."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise SlmError("ONNX export needs optimum's ONNX exporter: pip install optimum-onnx onnxruntime (it requires "
                       "transformers 4.x; slmkit's default environment has 5.x, so use a separate one)") from e
    path, name = model_dir(source)
    try:
        main_export(str(path), output=str(out), task="text-generation-with-past", no_post_process=False)
    except Exception as e:  # optimum raises ValueError/KeyError for unsupported architectures
        raise SlmError(f"optimum cannot export {name} to ONNX: {str(e).splitlines()[0]}") from e
    return Path(out)


def export(model: str | None = None, to: str = "gguf", quant: str = "q8_0", out: Path | None = None,
           check: bool = True, tokens: int = 64) -> dict:
    """Ship a model: a GGUF that llama.cpp runs (llama.cpp's own converter and quantiser), or ONNX.

    Args:
        model: A run's model directory, any HF directory, a .gguf file or a packaged zoo model (default: the
            embedded SmolLM2).
        to: gguf (llama.cpp) or onnx (optimum).
        quant: GGUF type: f32, f16, bf16, q8_0 (llama.cpp's converter), or a quant q4_k_m, q5_k_m, q6_k, q4_0...
            (llama.cpp's quantiser).
        out: Output file (GGUF) or directory (ONNX). Default: NAME-QUANT.gguf / NAME-onnx here.
        check: GGUF: run it in llama.cpp beside the PyTorch model and report greedy agreement and next-token logit
            differences (also written to NAME.parity.json).
        tokens: Greedy tokens compared by the parity check.
    """
    if to == "onnx":
        return {"format": "onnx", "out": str(to_onnx(model, out or Path(f"{Path(model or 'model').name}-onnx")))}
    if to != "gguf":
        raise SlmError(f"unknown export format '{to}' (gguf or onnx)")
    target = to_gguf(model, out, quant)
    result = {"format": "gguf", "quant": quant, "out": str(target), "bytes": target.stat().st_size}
    if check:
        result["parity"] = parity(model, target, tokens=tokens)
        (target.parent / f"{target.stem}.parity.json").write_text(json.dumps(result["parity"], indent=2) + "\n")
    return result


def report(r: dict, args: dict, out) -> None:
    if r["format"] == "onnx":
        out.print(f"ONNX model -> {r['out']}")
        return
    out.print(f"GGUF ({r['quant']}, {r['bytes'] / 1e6:.1f} MB) -> {r['out']}")
    if "parity" in r:
        p = r["parity"]
        out.print(f"parity vs PyTorch fp32 over {p['tokens']} greedy tokens: {p['agree']:.0%} of positions agree "
                  f"(identical for the first {p['agree_prefix']}); mean |Δlogit| {p['mean_abs_logit_delta']:.4f}")
