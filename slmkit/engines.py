"""Inference engines behind `slm generate`, `slm chat` and `slm serve`.

- `torch`: slmkit's own decode loop over a `transformers` model (`generate.py`): every feature (EFT, batching in
  the server, any architecture, models being trained).
- `llamacpp`: the model as a GGUF in llama.cpp through `llama-cpp-python`: several times faster on a CPU and
  loaded in a fraction of a second. A .gguf file and the embedded default (its packaged GGUF) run directly; any
  other decoder is exported once with llama.cpp's converter (`export.to_gguf`) into the cache.
- `vllm`: CUDA GPUs, through vLLM.

Every engine is opened as a `models.Loaded` whose `engine` decodes. Prompts are rendered and tokenised by the
model's Hugging Face tokenizer and text is detokenised by it too, so the chat template, stop strings and
token counts are the same whatever the engine; only the token loop differs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

from slmkit.errors import SlmError

ENGINES = ("auto", "torch", "llamacpp", "vllm")
# what a model directory (and a packaged model) is exported to for llama.cpp: f16 keeps the model's logits (within
# 0.05 of torch fp32, alone or batched), where the packaged Q4_1 file and a q8_0 export move them by more than 1 and
# make them depend on the batch (benchmarks/results/engines.json, docs/serving.md). A smaller file is one
# `slm export --quant` away, run with `-m FILE.gguf`.
EXPORT_QUANT = "f16"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def open_model(source: str | None, engine: str = "auto", *, dtype: str = "auto", progress: bool = True):
    """Load `source` for inference on `engine` (ENGINES). `auto`: vLLM on a CUDA GPU when vllm is installed;
    llama.cpp when llama-cpp-python is installed and the model is a .gguf file, a packaged model, or a directory
    with a cached export from an earlier `--engine llamacpp`; torch otherwise (and when llama.cpp cannot open it)."""
    from slmkit.models import load

    if engine not in ENGINES:
        raise SlmError(f"unknown engine '{engine}' (one of {', '.join(ENGINES)})")
    if engine == "auto":
        engine = pick_engine(source)
        if engine == "llamacpp":
            try:
                return open_llamacpp(source, progress=progress)
            except SlmError as e:
                if progress:
                    print(f"llama.cpp cannot run {source or 'the default model'} ({e}); using torch", file=sys.stderr)
                engine = "torch"
    if engine == "llamacpp":
        return open_llamacpp(source, progress=progress)
    if engine == "vllm":
        return open_vllm(source)
    loaded = load(source, dtype=dtype, progress=progress)
    return open_vision(loaded) if loaded.task == "vision-lm" else loaded


def pick_engine(source: str | None) -> str:
    if installed("vllm") and cuda_available():
        return "vllm"
    if not installed("llama_cpp"):
        return "torch"
    try:
        kind, path, _ = llamacpp_source(source)
    except SlmError:
        return "torch"  # not for llama.cpp; the torch loader reports anything wrong with the source
    return "llamacpp" if kind != "dir" or _export_path(path).is_file() else "torch"


# --- llama.cpp -----------------------------------------------------------------------------------------


def llamacpp_source(source: str | None):
    """What llama.cpp can run of `source`, checked without reading weights: (kind, path, name) with kind "gguf"
    (a .gguf file), "zoo" (a packaged causal LM; path None) or "dir" (a model directory); else a SlmError."""
    from slmkit import zoo
    from slmkit.models import resolve

    kind, path = resolve(source)
    if kind == "zoo":
        spec = zoo.get(source or zoo.DEFAULT_MODEL)
        if spec.package is None:
            raise SlmError(f"{spec.name} is a random-initialised spec; llama.cpp runs trained checkpoints")
        if spec.task != "causal-lm":
            raise SlmError(f"{spec.name} is a {spec.task} model; llama.cpp runs causal LMs here")
        return kind, None, spec.name
    if kind not in ("gguf", "dir"):
        raise SlmError(f"{source}: llama.cpp runs a .gguf file or a local model directory")
    return kind, path, source


def llamacpp_files(source: str | None) -> tuple[Path, Path | None, str]:
    """(the GGUF llama.cpp runs for `source`, the HF directory it is exported from, the model's name). A .gguf file
    the user names
    runs as it is (directory None). A model directory, and a packaged model, run as an EXPORT_QUANT export of their
    full-precision weights, made once into the cache: the embedded default ships as a 4-bit (Q4_1) GGUF whose
    logits in llama.cpp stray from the model's and change with the batch, so its dequantised weights are exported
    again."""
    from slmkit import zoo
    from slmkit.models import convert_gguf, packaged_weights

    kind, path, name = llamacpp_source(source)
    if kind == "gguf":
        return path, None, name
    if kind == "zoo":
        weights = packaged_weights(zoo.get(name))
        path = convert_gguf(weights) if weights.suffix == ".gguf" else weights
    return _export_path(path), path, name


def _export_path(directory: Path) -> Path:
    """Where the llama.cpp export of a model directory is cached: keyed by its path and weights' mtimes."""
    from slmkit.models import WEIGHT_FILES, cache_dir

    stamps = [f"{f}:{(directory / f).stat().st_mtime_ns}" for f in WEIGHT_FILES if (directory / f).is_file()]
    key = hashlib.sha256(f"{directory.resolve()}|{'|'.join(stamps)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{directory.resolve().name}-{key}-{EXPORT_QUANT}.gguf"


def gguf_tokenizer(gguf: Path):
    """The Hugging Face tokenizer stored in a GGUF, read once and cached beside its dequantised copy."""
    import transformers

    from slmkit.models import _one_line, gguf_cache_path, quiet_transformers

    quiet_transformers()
    converted = gguf_cache_path(gguf)  # where `models.load` dequantises it, tokenizer included
    directory = converted.with_name(converted.name + "-tokenizer")
    for known in (converted, directory):
        if (known / "tokenizer_config.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(known)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise SlmError(f"cannot read the tokenizer of GGUF file {gguf}: {_one_line(e)}") from e
    tokenizer.save_pretrained(directory)
    return tokenizer


def open_llamacpp(source: str | None, *, n_ctx: int | None = None, threads: int | None = None,
                  progress: bool = True):
    """A `Loaded` whose engine is llama.cpp (`llamacpp_files` says which GGUF; an export is made once)."""
    import transformers

    from slmkit.export import require_llama_cpp, to_gguf
    from slmkit.models import Loaded, quiet_transformers

    require_llama_cpp("--engine llamacpp")
    gguf, directory, name = llamacpp_files(source)
    if directory is None:
        tokenizer = gguf_tokenizer(gguf)
    else:
        if not gguf.is_file():
            if progress:
                print(f"first llama.cpp use of {directory}: exporting it to {EXPORT_QUANT} GGUF (once) -> {gguf}",
                      file=sys.stderr)
            to_gguf(str(directory), gguf, EXPORT_QUANT, progress=progress)
        quiet_transformers()
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    try:
        engine = LlamaCppEngine(gguf, n_ctx=n_ctx, threads=threads)
    except SlmError as e:
        raise SlmError(f"{e}; is {gguf} a complete GGUF file?") from e
    return Loaded(None, tokenizer, name, gguf, "causal-lm", engine=engine)


class LlamaCppEngine:
    """A GGUF in llama.cpp, several sequences in one context (`llamacpp.py`): the prompts of a `generate` batch and
    the rows of the server's continuous batching decode together. Sampling, stop handling and the decode loop are
    slmkit's own (`generate.decode_tokens`, `batching.BatchEngine`); llama.cpp computes the logits."""

    name = "llamacpp"

    def __init__(self, gguf: Path, *, n_ctx: int | None = None, threads: int | None = None):
        from slmkit.llamacpp import LlamaContext

        self.gguf, self.threads = Path(gguf), threads
        self.context = LlamaContext(self.gguf, n_seq=1, n_cells=256, threads=threads)  # grown by `reserve`
        trained = self.context.lc.llama_model_n_ctx_train(self.context.model)
        self.n_ctx = min(n_ctx or trained, trained) if trained > 0 else n_ctx or 4096
        self.eos = {self.context.lc.llama_vocab_eos(self.context.lc.llama_model_get_vocab(self.context.model))}

    def reserve(self, n_seq: int, cells: int) -> None:
        """Make the context hold `n_seq` sequences sharing `cells` KV cells (a new, larger one if needed)."""
        from slmkit.llamacpp import LlamaContext

        if self.context.n_cells < cells or self.context.n_seq < n_seq:
            self.context = LlamaContext(self.gguf, n_seq=max(n_seq, self.context.n_seq),
                                        n_cells=max(cells, self.context.n_cells), threads=self.threads)

    def reserve_batch(self, rows: int, kept_tokens: int) -> int:
        """Size the context for continuous batching (`batching.BatchEngine`): `rows` running sequences and the copies
        made as they join, in KV_CELLS cells of which `kept_tokens` hold prompts kept for reuse. Returns the cells
        the running requests may hold; a request that does not fit waits until others finish."""
        from slmkit.llamacpp import KV_CELLS

        self.reserve(min(256, 4 * rows + 16), max(KV_CELLS, self.n_ctx + kept_tokens))
        return self.context.n_cells - kept_tokens

    def sequences(self, input_ids, attention_mask):
        """A `CachedLM`-like cache of these (left-padded) prompts in llama.cpp (`llamacpp.Sequences`)."""
        from slmkit.llamacpp import Sequences

        return Sequences(self.context, input_ids, attention_mask)

    def decode(self, model, input_ids, attention_mask, params, eos: set[int]) -> Iterator:
        """The `generate.decode_tokens` loop over llama.cpp sequences: yields a (batch,) tensor per step."""
        from slmkit.generate import decode_tokens

        rows, width = input_ids.shape
        self.reserve(rows, rows * (width + params.max_new_tokens))
        return decode_tokens(model, input_ids, attention_mask, params, eos,
                             lm_class=lambda _, ids, mask: self.sequences(ids, mask))


# --- images: LLaVA-style vision-language models ----------------------------------------------------------


IMAGE_TOKEN = "<image>"


def read_image(source: str | bytes | Path):
    """A PIL RGB image from a file path, raw bytes, or a base64 `data:image/...;base64,` URL (OpenAI's image
    content part)."""
    import base64
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, str) and source.startswith("data:"):
            header, _, payload = source.partition(",")
            if ";base64" not in header:
                raise SlmError("an image data URL must be base64 (data:image/png;base64,...)")
            source = base64.b64decode(payload, validate=True)
        elif isinstance(source, str) and source.startswith(("http://", "https://")):
            raise SlmError("image URLs are not fetched; send the image as a base64 data URL")
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source)).convert("RGB")
        path = Path(source)
        if not path.is_file():
            raise SlmError(f"image not found: {path}")
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, ValueError, OSError) as e:
        raise SlmError(f"cannot read the image: {type(e).__name__}: {e}") from e


def open_vision(loaded):
    """A vision-language checkpoint (LLaVA-style: `model(input_ids, pixel_values)`) as a `Loaded` whose engine
    takes images: the prompt holds one IMAGE_TOKEN per image."""
    from transformers import AutoProcessor

    if loaded.path is None:
        raise SlmError(f"{loaded.name}: a vision-language model loads from a checkpoint directory with its processor")
    try:
        processor = AutoProcessor.from_pretrained(loaded.path)
    except Exception as e:
        raise SlmError(f"{loaded.path}: no image processor beside the model ({type(e).__name__})") from e
    loaded.engine = VisionEngine(loaded.model, processor)
    loaded.tokenizer = processor.tokenizer
    return loaded


class VisionEngine:
    """A LLaVA-style model on torch: IMAGE_TOKEN in the prompt is expanded to the image's patch tokens, the
    pixels go in beside them, and `transformers`' own `generate` decodes (its token stream handed to slmkit's
    text tracker)."""

    name = "torch"
    takes_images = True

    def __init__(self, model, processor):
        from PIL import Image

        self.model, self.processor = model, processor
        self.image_token = model.config.image_token_id
        probe = processor(text=IMAGE_TOKEN, images=[Image.new("RGB", (8, 8))], return_tensors="pt")
        self.tokens_per_image = int((probe.input_ids == self.image_token).sum())
        text = getattr(model.config, "text_config", model.config)
        self.n_ctx = getattr(text, "max_position_embeddings", None)
        self.eos = set()
        tok = processor.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def decode(self, model, input_ids, attention_mask, params, eos: set[int], images=None):
        import queue
        import threading

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        ids = input_ids[0][attention_mask[0].bool()].tolist()
        slots = ids.count(self.image_token)
        if slots != len(images or []):
            raise SlmError(f"the prompt has {slots} image placeholder(s) but {len(images or [])} image(s) came with it")
        expanded = [t for token in ids for t in ([token] * self.tokens_per_image if token == self.image_token
                                                   else [token])]
        extra = {}
        if images:
            extra["pixel_values"] = self.processor.image_processor(images, return_tensors="pt").pixel_values.to(
                self.model.dtype)
        tokens: queue.Queue = queue.Queue()

        class Stream(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() first hands over the prompt
                    self.first = False
                    return
                for token in value.reshape(-1).tolist():
                    tokens.put(token)

            def end(self):
                tokens.put(None)

        sampling = {"do_sample": params.temperature > 0, "repetition_penalty": params.repetition_penalty}
        if params.temperature > 0:
            sampling.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.ignore_eos:
            sampling["min_new_tokens"] = params.max_new_tokens
        errors, stop = [], threading.Event()

        class Stopped(StoppingCriteria):  # the caller stopped reading (a stop string, a client that left)
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        def run():
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    self.model.generate(input_ids=torch.tensor([expanded]), attention_mask=torch.ones(1, len(expanded),
                                        dtype=torch.long), max_new_tokens=params.max_new_tokens, streamer=Stream(),
                                        pad_token_id=self.pad, stopping_criteria=StoppingCriteriaList([Stopped()]),
                                        **sampling, **extra)
            except Exception as e:  # reported in the caller's thread
                errors.append(e)
                tokens.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while (token := tokens.get()) is not None:
                yield [token]
        finally:
            stop.set()
            worker.join()
        if errors:
            raise errors[0]


# --- vLLM ----------------------------------------------------------------------------------------------


def vllm_sampling(params) -> dict:
    """slmkit's SamplingParams as vLLM SamplingParams keyword arguments (stop strings stay with slmkit's
    text tracker, so they behave the same on every engine)."""
    return {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1, "repetition_penalty": params.repetition_penalty,
            "seed": params.seed, "ignore_eos": params.ignore_eos, "detokenize": False}


def open_vllm(source: str | None):
    """A `Loaded` whose engine is vLLM (a CUDA GPU and `pip install 'slmkit[gpu]'`). Only the tokenizer and config
    are read here; the weights go straight to vLLM."""
    import transformers

    from slmkit.export import model_dir
    from slmkit.models import Loaded, quiet_transformers, task_of

    if not installed("vllm"):
        raise SlmError("--engine vllm needs vLLM: pip install 'slmkit[gpu]' (CUDA GPUs)")
    if not cuda_available():
        raise SlmError("--engine vllm needs a CUDA GPU; use --engine llamacpp or torch on a CPU")
    path, name = model_dir(source)
    quiet_transformers()
    task = task_of(transformers.AutoConfig.from_pretrained(path))
    if task not in ("causal-lm", "seq2seq"):
        raise SlmError(f"{name} is a {task} model; vLLM serves text generators here")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)  # the same tokenizer the torch path uses
    return Loaded(None, tokenizer, name, path, task, engine=VllmEngine(path))


class VllmEngine:
    """A model in vLLM. `generate` and `slm chat` stream one prompt's tokens as vLLM makes them; the server hands
    all its requests to vLLM's own scheduler (`batching.VllmBatchEngine`), which batches them on the GPU."""

    name = "vllm"

    def __init__(self, path: Path):
        from vllm import LLM

        self.llm = LLM(model=str(path), tokenizer=str(path))
        self.n_ctx = self.llm.llm_engine.model_config.max_model_len
        self.eos = set()
        self._ids = iter(range(1 << 62))

    def add(self, ids: list[int], params) -> str:
        """Queue one prompt (token ids) in vLLM's scheduler; returns its request id."""
        from vllm import SamplingParams, TokensPrompt

        request_id = f"slmkit-{next(self._ids)}"
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids),
                                        SamplingParams(**vllm_sampling(params)))
        return request_id

    def step(self) -> list[tuple[str, list[int], bool]]:
        """One scheduler step over every queued request: (request id, all its tokens so far, finished)."""
        return [(out.request_id, list(out.outputs[0].token_ids), out.finished) for out in self.llm.llm_engine.step()]

    def abort(self, request_id: str) -> None:
        self.llm.llm_engine.abort_request(request_id)

    def decode(self, model, input_ids, attention_mask, params, eos: set[int]) -> Iterator[list[int]]:
        """One prompt's tokens as vLLM makes them (the `generate.decode_tokens` interface for one row)."""
        request_id = self.add(input_ids[0][attention_mask[0].bool()].tolist(), params)
        sent, finished = 0, False
        try:
            while not finished:
                for rid, tokens, done in self.step():
                    if rid == request_id:
                        yield from ([t] for t in tokens[sent:])
                        sent, finished = len(tokens), done
        finally:
            if not finished:
                self.abort(request_id)
