"""Continuous batching: many completions generated together over one model, a row joining or leaving at any step.

`BatchEngine` owns the model in one thread and a cache over all running requests (a `generate.CachedLM` for torch
models, a `llamacpp.Sequences` for the llama.cpp engine: the same interface over llama.cpp's own multi-sequence
KV cache). Each iteration it admits waiting requests (one batched prefill, then their rows join the running
cache), decodes one token for every running row, sends each row's text to its request's event queue and drops
the rows that finished or were cancelled. A request therefore never waits for another to end. The prefill of
the last few distinct prompts is kept: another request with the same prompt (the N samples of best-of-N) starts
from a copy of its cache instead of running the prompt again. (Encoder-decoder models batch the requests that
arrive together and admit new ones when that group ends.) `VllmBatchEngine` hands every request to vLLM's own
scheduler; `SerialEngine` runs an engine with its own token loop (a vision model's `generate`) one request at a
time through the same request handling.

The HTTP server (`serve.py`) and offline sampling (`complete_many`: TinyGSM's best-of-N) both use it.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from slmkit.errors import ApiError, SlmError
from slmkit.generate import CachedLM, Completion, SamplingParams, _TextTracker, next_tokens, stop_ids, takes_images

# the batching engine keeps the prefill (KV cache, first logits) of up to 8 recent distinct prompts, 8K tokens in all
KEPT_PREFILLS = (8, 8192)
# the context assumed for a model that states none (T5's relative positions have no hard limit)
UNSTATED_CONTEXT = 2048
# a prompt longer than this many characters per token of context is refused before it is tokenised
CHARS_PER_TOKEN = 32


@dataclass
class Request:
    """One completion being generated. Its events go to `events` as (index, kind, payload) tuples:
    ("text", delta) while it runs, then ("done", Completion) or ("error", message)."""

    ids: list[int]
    params: SamplingParams
    tracker: _TextTracker
    events: queue.Queue
    index: int = 0
    prompt: str = ""
    cancelled: bool = False
    generator: object = None
    seen: list[int] = field(default_factory=list)  # prompt and generated tokens
    images: list | None = None  # PIL images for the prompt's image placeholders (a vision engine's requests)

    @property
    def generated(self) -> int:
        return len(self.seen) - len(self.ids)

    @property
    def cells(self) -> int:
        """KV cache positions it may fill: its prompt and its answer."""
        return len(self.ids) + self.params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.cancelled or self.tracker.finished is not None or self.generated >= self.params.max_new_tokens


class BatchEngine:
    """Owns the model; generates for all submitted requests together (see the module docstring)."""

    def __init__(self, loaded, max_batch: int = 16, max_queue: int | None = None):
        if loaded.task not in ("causal-lm", "seq2seq") and not takes_images(loaded):
            raise SlmError(f"{loaded.name} is a {loaded.task} model; only causal-lm, seq2seq and vision-language "
                           "models can be served")
        if loaded.tokenizer is None:
            raise SlmError(f"{loaded.name} has no tokenizer; save one beside the model to serve it")
        self.loaded, self.max_batch, self.max_queue = loaded, max_batch, max_queue
        # an engine with a fixed KV cache (llama.cpp) sizes it for the batch and says how many cells requests may hold
        reserve = getattr(loaded.engine, "reserve_batch", None)
        self.budget: int | None = reserve(max_batch, KEPT_PREFILLS[1]) if reserve else None
        self._held: Request | None = None  # the next request in line, waiting for cells to free
        self.context = min(loaded.context_length or UNSTATED_CONTEXT, self.budget or 1 << 62)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.encoder_decoder = loaded.engine is None and bool(self.model.config.is_encoder_decoder)
        self.eos = stop_ids(loaded)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos or {0})
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.stats = {"requests": 0, "tokens": 0, "max_batch_seen": 0, "steps": 0, "prefills_reused": 0, "running": 0}
        self._prefixes: OrderedDict[tuple[int, ...], tuple] = OrderedDict()  # prompt ids -> (1-row cache, logits)
        self._cache = getattr(loaded.engine, "sequences", None) or (lambda ids, mask: CachedLM(self.model, ids, mask))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slmkit-engine", daemon=True)
        self._thread.start()

    def submit(self, text: str, params: SamplingParams, events: queue.Queue, *, templated: bool,
               index: int = 0, images: list | None = None) -> Request:
        """Queue one prompt; its events arrive on `events`. Raises ApiError if it cannot run: an empty prompt, one
        longer than the context, a full queue. `params.max_new_tokens` is clamped to what fits the context."""
        context = self.context
        if len(text) > CHARS_PER_TOKEN * context:  # surely too long: refused before tokenising it costs anything
            raise ApiError(400, f"the prompt is {len(text):,} characters, far more than the model's context of "
                           f"{context} tokens", "messages", "context_length_exceeded")
        if self.max_queue is not None and self.waiting.qsize() >= self.max_queue:
            raise ApiError(429, f"the server is busy ({self.max_queue} requests waiting); retry shortly", None,
                           "server_busy", headers={"Retry-After": "1"})
        ids = self.tokenizer(text, add_special_tokens=not templated).input_ids
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {context} tokens",
                           "messages", "context_length_exceeded")
        # a decoder's prompt and answer share its context; an encoder-decoder's answer has the context to itself
        params.max_new_tokens = min(params.max_new_tokens, context - (0 if self.encoder_decoder else len(ids)))
        eos = set() if params.ignore_eos else self.eos
        req = Request(ids, params, _TextTracker(self.tokenizer, list(params.stop), eos), events, index, text,
                      seen=list(ids), images=images)
        if params.seed is not None:
            import torch

            req.generator = torch.Generator().manual_seed(params.seed)
        self.waiting.put(req)
        return req

    def close(self, timeout: float = 10) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    # The engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        running: list[Request] = []
        lm: CachedLM | None = None
        last = None  # each running row's newest token, not yet fed to the model
        while not self._stop.is_set():
            admitted: list[Request] = []
            try:
                admitted = self._admit(running, allow=lm is None or not self.encoder_decoder)
                if admitted:
                    # llama.cpp decodes the joining prompts in the running rows' next step (one call for both)
                    beside = (lm, last) if running and hasattr(lm, "step_joining") else None
                    fresh, tokens, logits = self._prefill(admitted, beside)
                    if logits is not None:
                        last = self._sample(logits, running)
                        self._deliver(running, last)
                    if lm is None:
                        lm, last, running = fresh, tokens, admitted
                    else:
                        lm.merge(fresh)
                        last, running = torch.cat([last, tokens]), running + admitted
                    del fresh  # merged (copied): a llama.cpp cache frees its sequences as it goes
                elif running:
                    logits = lm.step(last[:, None])[:, -1]
                    last = self._sample(logits, running)
                    self._deliver(running, last)
                if running:
                    lm, last, running = self._retire(lm, last, running)
                self.stats["running"] = len(running)
            except Exception as e:  # an engine failure ends the affected requests with an error, not the server
                for req in {id(r): r for r in running + admitted}.values():
                    req.events.put((req.index, "error", f"generation failed: {type(e).__name__}: {e}"))
                running, lm, last = [], None, None
                self._prefixes.clear()  # caches made beside the failure are not trusted again

    def _admit(self, running: list[Request], *, allow: bool) -> list[Request]:
        """Waiting requests that join now, in arrival order: while rows are free and, with a KV budget, while
        their cells fit (the first that does not fit waits, held, until enough rows finish)."""
        if not allow:
            return []
        admitted, used = [], sum(r.cells for r in running)
        while len(running) + len(admitted) < self.max_batch:
            req, self._held = self._held, None
            if req is None:
                try:  # an idle engine waits a moment for work; a busy one only takes what is there
                    req = self.waiting.get(timeout=0.1) if not running and not admitted else self.waiting.get_nowait()
                except queue.Empty:
                    break
            if req.cancelled:
                continue
            if self.budget is not None and used + req.cells > self.budget:
                self._held = req
                break
            admitted.append(req)
            used += req.cells
        return admitted

    def _prefill(self, reqs: list[Request], beside=None):
        """A cache for newly admitted rows, their first tokens, and the logits of the running rows' next step when
        `beside` (running cache, their last tokens) was decoded in the same call (else None). The prompts not
        kept from an earlier prefill run in one left-padded batch; the rows' kept caches are then merged into one
        new cache (the first is copied, merge only reads the others)."""
        import torch

        stepped = None
        if self.encoder_decoder:
            logits, lm, _ = self._run_prompts([r.ids for r in reqs])
        else:
            keys = [tuple(r.ids) for r in reqs]
            new = [k for k in dict.fromkeys(keys) if k not in self._prefixes]
            if new:
                batch_logits, batch, stepped = self._run_prompts(new, beside)
                for row, key in enumerate(new):
                    self._prefixes[key] = (batch.copy_rows([row]), batch_logits[row:row + 1])
            self.stats["prefills_reused"] += len(reqs) - len(new)
            lm = self._prefixes[keys[0]][0].copy_rows([0])  # merge reads the kept caches; only this one changes
            for key in keys[1:]:
                lm.merge(self._prefixes[key][0])
            logits = torch.cat([self._prefixes[key][1] for key in keys])
            for key in keys:
                self._prefixes.move_to_end(key)
            while len(self._prefixes) > KEPT_PREFILLS[0] or sum(map(len, self._prefixes)) > KEPT_PREFILLS[1]:
                self._prefixes.popitem(last=False)
        tokens = self._sample(logits, reqs)
        self._deliver(reqs, tokens)
        self.stats["requests"] += len(reqs)
        return lm, tokens, stepped

    def _run_prompts(self, prompts: list, beside=None):
        """One left-padded prefill of these prompts (token id sequences): (last logits, CachedLM, the running
        rows' logits when `beside` = (running cache, last tokens) stepped in the same call, else None)."""
        import torch

        rows = [list(p) for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        lm = self._cache(ids, mask)
        if beside is None:
            return lm.prefill(ids)[:, -1], lm, None
        running, last = beside
        stepped, first = running.step_joining(last[:, None], lm)
        return first, lm, stepped

    def _sample(self, logits, reqs: list[Request]):
        """Greedy rows in one argmax; rows with their own sampling settings one by one."""
        import torch

        with torch.inference_mode():
            tokens = logits.float().argmax(-1)
            for row, req in enumerate(reqs):
                p = req.params
                if p.temperature > 0 or p.repetition_penalty != 1.0:
                    seen = torch.tensor([req.seen]) if p.repetition_penalty != 1.0 else None  # only a penalty reads it
                    tokens[row] = next_tokens(logits[row:row + 1], p, seen, req.generator)[0]
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(reqs))
        return tokens

    def _deliver(self, reqs: list[Request], tokens) -> None:
        for req, token in zip(reqs, tokens.tolist(), strict=True):
            if req.finished:  # an encoder-decoder group keeps finished rows until all end
                continue
            req.seen.append(token)
            self.stats["tokens"] += 1
            delta = req.tracker.add(token)
            if delta:
                req.events.put((req.index, "text", delta))
            if req.finished and not req.cancelled:
                self._complete(req)

    @staticmethod
    def _complete(req: Request) -> None:
        delta = req.tracker.close()
        if delta:
            req.events.put((req.index, "text", delta))
        completion = Completion(req.prompt, req.tracker.text, len(req.ids), len(req.tracker.ids), req.tracker.finished)
        req.events.put((req.index, "done", completion))

    def _retire(self, lm: CachedLM, last, running: list[Request]):
        keep = [i for i, r in enumerate(running) if not r.finished]
        if not keep:
            return None, None, []
        if len(keep) == len(running) or self.encoder_decoder:
            return lm, last, running
        lm.select(keep)
        return lm, last[keep], [running[i] for i in keep]


class SerialEngine(BatchEngine):
    """For an engine with its own token loop (a vision model's `generate`): requests run one at a time, in arrival
    order, through the same request/stop-string/event handling as the batching engine."""

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            try:
                req = self.waiting.get(timeout=0.1)
            except queue.Empty:
                continue
            if req.cancelled:
                continue
            self.stats["requests"] += 1
            self.stats["max_batch_seen"] = self.stats["running"] = 1
            ids = torch.tensor([req.ids])
            extra = {"images": req.images} if req.images else {}
            try:
                for tokens in self.loaded.engine.decode(None, ids, torch.ones_like(ids), req.params, req.tracker.eos,
                                                        **extra):
                    self.stats["steps"] += 1
                    self._deliver([req], torch.tensor(tokens))
                    if req.finished:
                        break
                if not req.finished:  # the engine ended the sequence itself
                    self._complete(req)
            except Exception as e:  # a failed request ends with an error; the server goes on
                req.events.put((req.index, "error", f"generation failed: {type(e).__name__}: {e}"))
            self.stats["running"] = 0


class VllmBatchEngine(BatchEngine):
    """vLLM schedules and batches on the GPU itself: every request goes to its scheduler as it arrives, and each
    step's new tokens go through the same stop-string and event handling as the other engines. A request that is
    cancelled or stops on a stop string is aborted in vLLM."""

    def _run(self) -> None:
        import torch

        engine = self.loaded.engine
        live: dict[str, Request] = {}  # vLLM request id -> request; its tokens delivered so far: req.generated
        while not self._stop.is_set():
            try:
                while True:
                    req = self.waiting.get(timeout=0.05) if not live else self.waiting.get_nowait()
                    if not req.cancelled:
                        rid = engine.add(req.ids, req.params)
                        live[rid] = req
                        self.stats["requests"] += 1
            except queue.Empty:
                pass
            try:
                for rid, tokens, done in engine.step() if live else []:
                    req = live.get(rid)
                    if req is None:  # aborted since
                        continue
                    for token in tokens[req.generated:]:
                        self._deliver([req], torch.tensor([token]))
                    if done:
                        if not req.finished:
                            self._complete(req)  # vLLM ended it (EOS or its max_tokens)
                        del live[rid]
                for rid in [rid for rid, req in live.items() if req.finished]:
                    engine.abort(rid)
                    del live[rid]
                self.stats["steps"] += 1
                self.stats["running"] = len(live)
                self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(live))
            except Exception as e:  # a failed step ends the running requests with an error; the server goes on
                for rid, req in live.items():
                    req.events.put((req.index, "error", f"generation failed: {type(e).__name__}: {e}"))
                    try:
                        engine.abort(rid)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                live.clear()


def engine_for(loaded, *, max_batch: int = 16, max_queue: int | None = None) -> BatchEngine:
    """The engine that batches this model's requests: `BatchEngine` over torch models and llama.cpp (whose engine
    gives `sequences`, a cache over its own multi-sequence context), `VllmBatchEngine` over vLLM (its own
    scheduler), `SerialEngine` over other engines with their own token loop (a vision model's `generate`)."""
    if loaded.engine is None or hasattr(loaded.engine, "sequences"):
        kind = BatchEngine
    else:
        kind = VllmBatchEngine if getattr(loaded.engine, "name", "") == "vllm" else SerialEngine
    return kind(loaded, max_batch=max_batch, max_queue=max_queue)


def complete_many(loaded, prompts: list[str], params: list[SamplingParams], *, max_batch: int = 16,
                  on_done=None) -> list[Completion]:
    """Complete many raw-text prompts through the continuous-batching engine, without HTTP: a row that ends
    frees its place for the next prompt at once, so no row waits for the longest of a fixed batch (the way
    to sample many solutions). `params[i]` is prompt i's (give each its own seed for independent samples);
    `on_done(i, completion)` is called as prompt i completes."""
    engine = engine_for(loaded, max_batch=max_batch)
    events: queue.Queue = queue.Queue()
    results: list[Completion | None] = [None] * len(prompts)
    try:
        for i, (text, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                engine.submit(text, p, events, templated=False, index=i)
            except ApiError as e:
                raise SlmError(f"prompt {i}: {e.message}") from e
        for _ in prompts:
            index, kind, payload = events.get()
            while kind == "text":
                index, kind, payload = events.get()
            if kind == "error":
                raise SlmError(f"prompt {index}: {payload}")
            results[index] = payload
            if on_done:
                on_done(index, payload)
    finally:
        engine.close()
    return results
