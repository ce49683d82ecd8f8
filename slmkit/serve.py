"""An OpenAI-compatible HTTP server over any model slmkit loads: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, streaming by server-sent events, OpenAI-style errors.

Concurrent requests are batched continuously: one engine thread owns the model and a `CachedLM` over all
running requests. Each iteration it admits waiting requests (one batched prefill, then their rows join the
running cache), decodes one token for every running row, streams each row's text to its client and drops
the rows that finished. A request therefore never waits for another to end. The prefill of the last few
distinct prompts is kept: another request with the same prompt (the N samples of best-of-N) starts from a
copy of its KV cache instead of running the prompt again. (Encoder-decoder models batch the requests that
arrive together and admit new ones when that group ends.)

The HTTP side is the standard library's threading server: a handler thread per connection parses the
request, submits it to the engine and relays the engine's events. No web framework is needed.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from slmkit.engines import IMAGE_TOKEN, read_image
from slmkit.errors import SlmError
from slmkit.generate import (
    CachedLM,
    Completion,
    SamplingParams,
    _TextTracker,
    format_prompt,
    is_chat_model,
    next_tokens,
    stop_ids,
    takes_images,
)

# the batching engine keeps the prefill (KV cache, first logits) of up to 8 recent distinct prompts, 8K tokens in all
KEPT_PREFILLS = (8, 8192)


class ApiError(Exception):
    """An error returned to the client in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# --- the batching engine ---------------------------------------------------------------------------------


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
    def finished(self) -> bool:
        return self.cancelled or self.tracker.finished is not None or self.generated >= self.params.max_new_tokens


class BatchEngine:
    """Owns the model; generates for all submitted requests together (see the module docstring)."""

    def __init__(self, loaded, max_batch: int = 16):
        if loaded.task not in ("causal-lm", "seq2seq") and not takes_images(loaded):
            raise SlmError(f"{loaded.name} is a {loaded.task} model; only causal-lm, seq2seq and vision-language "
                           "models can be served")
        if loaded.tokenizer is None:
            raise SlmError(f"{loaded.name} has no tokenizer; save one beside the model to serve it")
        self.loaded, self.max_batch = loaded, max_batch
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.encoder_decoder = loaded.engine is None and bool(self.model.config.is_encoder_decoder)
        self.eos = stop_ids(loaded)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos or {0})
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.stats = {"requests": 0, "tokens": 0, "max_batch_seen": 0, "steps": 0, "prefills_reused": 0}
        self._prefixes: OrderedDict[tuple[int, ...], tuple] = OrderedDict()  # prompt ids -> (1-row CachedLM, logits)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slmkit-engine", daemon=True)
        self._thread.start()

    def submit(self, text: str, params: SamplingParams, events: queue.Queue, *, templated: bool,
               index: int = 0, images: list | None = None) -> Request:
        """Queue one prompt; its events arrive on `events`. Raises ApiError if it cannot run."""
        ids = self.tokenizer(text, add_special_tokens=not templated).input_ids
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        context = self.loaded.context_length
        if context and not self.encoder_decoder:
            if len(ids) >= context:
                raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {context} tokens",
                               "messages", "context_length_exceeded")
            params.max_new_tokens = min(params.max_new_tokens, context - len(ids))
        eos = set() if params.ignore_eos else self.eos
        req = Request(ids, params, _TextTracker(self.tokenizer, list(params.stop), eos), events, index, text,
                      seen=list(ids), images=images)
        if params.seed is not None:
            import torch

            req.generator = torch.Generator().manual_seed(params.seed)
        self.waiting.put(req)
        return req

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # The engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        running: list[Request] = []
        lm: CachedLM | None = None
        last = None  # each running row's newest token, not yet fed to the model
        while not self._stop.is_set():
            admitted: list[Request] = []
            try:
                admitted = self._admit(len(running), block=not running, allow=lm is None or not self.encoder_decoder)
                if admitted:
                    fresh, tokens = self._prefill(admitted)
                    if lm is None:
                        lm, last, running = fresh, tokens, admitted
                    else:
                        lm.merge(fresh)
                        last, running = torch.cat([last, tokens]), running + admitted
                elif running:
                    logits = lm.step(last[:, None])[:, -1]
                    last = self._sample(logits, running)
                    self._deliver(running, last)
                if running:
                    lm, last, running = self._retire(lm, last, running)
            except Exception as e:  # an engine failure ends the affected requests with an error, not the server
                for req in {id(r): r for r in running + admitted}.values():
                    req.events.put((req.index, "error", f"generation failed: {type(e).__name__}: {e}"))
                running, lm, last = [], None, None

    def _admit(self, n_running: int, *, block: bool, allow: bool) -> list[Request]:
        if not allow:
            return []
        admitted = []
        try:
            if block:
                admitted.append(self.waiting.get(timeout=0.1))
            while n_running + len(admitted) < self.max_batch:
                admitted.append(self.waiting.get_nowait())
        except queue.Empty:
            pass
        return [r for r in admitted if not r.cancelled]

    def _prefill(self, reqs: list[Request]):
        """A cache for newly admitted rows and their first tokens. The prompts not kept from an earlier prefill
        run in one left-padded batch; the rows' kept caches are then merged into one new cache (the first is
        copied, merge only reads the others)."""
        import torch

        if self.encoder_decoder:
            logits, lm = self._run_prompts([r.ids for r in reqs])
        else:
            keys = [tuple(r.ids) for r in reqs]
            new = [k for k in dict.fromkeys(keys) if k not in self._prefixes]
            if new:
                batch_logits, batch = self._run_prompts(new)
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
        return lm, tokens

    def _run_prompts(self, prompts: list):
        """One left-padded prefill of these prompts (token id sequences): (last logits, CachedLM)."""
        import torch

        rows = [list(p) for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        lm = CachedLM(self.model, ids, mask)
        return lm.prefill(ids)[:, -1], lm

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
    """For engines with their own token loop (llama.cpp, vLLM): requests run one at a time, in arrival order,
    through the same request/stop-string/event handling as the batching engine."""

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
            self.stats["max_batch_seen"] = 1
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


def complete_many(loaded, prompts: list[str], params: list[SamplingParams], *, max_batch: int = 16,
                  on_done=None) -> list[Completion]:
    """Complete many raw-text prompts through the continuous-batching engine, without HTTP: a row that ends
    frees its place for the next prompt at once, so no row waits for the longest of a fixed batch (the way
    to sample many solutions). `params[i]` is prompt i's (give each its own seed for independent samples);
    `on_done(i, completion)` is called as prompt i completes."""
    engine = (SerialEngine if loaded.engine is not None else BatchEngine)(loaded, max_batch=max_batch)
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


# --- requests and responses ------------------------------------------------------------------------------


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}' must be between {low} and {high} (got {value})", name)
    return kind(value)


def sampling_from(body: dict, default_max_tokens: int) -> SamplingParams:
    """OpenAI request fields (plus vLLM's top_k, repetition_penalty, ignore_eos) -> SamplingParams."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported; use 'repetition_penalty'", name)
    if body.get("logprobs"):
        raise ApiError(400, "'logprobs' is not supported by this server", "logprobs")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    temperature = _number(body, "temperature", 1.0, float, 0, 2)
    top_p = _number(body, "top_p", 1.0, float, 0, 1)
    if top_p == 0:  # "only the likeliest token" is greedy decoding
        temperature, top_p = 0.0, 1.0
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return SamplingParams(
        max_new_tokens=_number({name: max_tokens}, name, default_max_tokens, int, 1, None),
        temperature=temperature,
        top_p=top_p,
        top_k=max(_number(body, "top_k", 0, int, -1, None), 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0.01, None),
        seed=_number(body, "seed", None, int),
        ignore_eos=bool(body.get("ignore_eos", False)),
        stop=stop,
    )


def _message_text(message: dict, i: int, images: list | None = None) -> dict:
    """One OpenAI message as {role, content}. Image content parts (base64 data URLs) become IMAGE_TOKEN in the
    text, their pictures appended to `images` (None: images are refused)."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text, and images for a model that takes them
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(part.get("text", ""))
            elif kind == "image_url" and images is not None:
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                try:
                    images.append(read_image(url or ""))
                except SlmError as e:
                    raise ApiError(400, f"messages[{i}]: {e}", f"messages[{i}].content") from e
                parts.append(IMAGE_TOKEN + "\n")
            elif kind == "image_url":
                raise ApiError(400, f"messages[{i}]: this model does not take images", f"messages[{i}].content")
            else:
                raise ApiError(400, f"messages[{i}]: content parts must be text or image_url", f"messages[{i}].content")
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts",
                       f"messages[{i}].content")
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": content}


class Server:
    """The HTTP server: `Server(loaded).start()` serves in the background (tests, notebooks);
    `serve_forever()` blocks (the CLI)."""

    def __init__(self, loaded, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
                 served_name: str | None = None, api_key: str | None = None, max_tokens: int = 512):
        self.loaded, self.api_key, self.max_tokens = loaded, api_key, max_tokens
        self.name = served_name or loaded.name
        self.engine = (SerialEngine if loaded.engine is not None else BatchEngine)(loaded, max_batch=max_batch)
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="slmkit-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        self.httpd.shutdown() if self._thread else None
        self.httpd.server_close()
        self.engine.close()

    # Endpoints --------------------------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "slmkit"}]}

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model not in (None, "", self.name, self.loaded.name):
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.name}'", "model",
                           "model_not_found")

    def prompts(self, body: dict, chat: bool) -> list[tuple[str, bool, list | None]]:
        """(text, templated, images) per prompt."""
        tok = self.loaded.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list", "messages")
            if not is_chat_model(tok):
                raise ApiError(400, f"{self.name} has no chat template; use /v1/completions", "messages")
            images = [] if takes_images(self.loaded) else None
            messages = [_message_text(m, i, images) for i, m in enumerate(messages)]
            return [(format_prompt(tok, messages, chat=True), True, images or None)]
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ApiError(400, "'prompt' must be a string or a list of strings", "prompt")
        return [(p, False, None) for p in prompt]

    def start_request(self, body: dict, chat: bool):
        self.check_model(body)
        n = _number(body, "n", 1, int, 1, 16)
        events: queue.Queue = queue.Queue()
        prompts = self.prompts(body, chat)
        params = sampling_from(body, self.max_tokens)
        reqs = []
        try:
            for text, templated, images in prompts:
                for k in range(n):  # each choice gets its own copy (the engine clamps max_new_tokens) and seed
                    seed = None if params.seed is None else params.seed + k
                    reqs.append(self.engine.submit(text, replace(params, seed=seed), events, templated=templated,
                                                   index=len(reqs), images=images))
        except ApiError:
            for r in reqs:
                r.cancelled = True
            raise
        return reqs, events


def _handler_for(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "slmkit"

        def log_message(self, format, *args):  # quiet: the CLI prints its own summary
            pass

        def send_json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorize(self) -> None:
            if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")

        def do_GET(self):
            try:
                self.authorize()
                if self.path.rstrip("/") == "/v1/models":
                    return self.send_json(200, server.models())
                if self.path == "/health":
                    return self.send_json(200, {"status": "ok", **server.engine.stats})
                raise ApiError(404, f"unknown path {self.path}")
            except ApiError as e:
                self.send_json(e.status, e.body())

        def do_POST(self):
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            try:
                self.authorize()
                if not chat and self.path.rstrip("/") != "/v1/completions":
                    raise ApiError(404, f"unknown path {self.path}")
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                except (ValueError, UnicodeDecodeError) as e:
                    raise ApiError(400, f"the request body is not valid JSON ({e})") from e
                if not isinstance(body, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                reqs, events = server.start_request(body, chat)
            except ApiError as e:
                return self.send_json(e.status, e.body())
            try:
                if body.get("stream"):
                    self.stream(reqs, events, chat, body)
                else:
                    self.respond(reqs, events, chat)
            except (BrokenPipeError, ConnectionResetError):
                for r in reqs:  # the client went away: stop generating for it
                    r.cancelled = True

        def respond(self, reqs, events, chat: bool) -> None:
            done: dict[int, Completion] = {}
            while len(done) < len(reqs):
                index, kind, payload = events.get()
                if kind == "error":
                    return self.send_json(500, ApiError(500, payload).body())
                if kind == "done":
                    done[index] = payload
            choices = []
            for i in range(len(reqs)):
                c = done[i]
                choice = {"index": i, "finish_reason": c.finish_reason, "logprobs": None}
                choice.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
                choices.append(choice)
            self.send_json(200, {"id": _new_id(chat), "object": "chat.completion" if chat else "text_completion",
                                 "created": int(time.time()), "model": server.name, "choices": choices,
                                 "usage": _usage(done, chat)})

        def stream(self, reqs, events, chat: bool, body: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends when the connection closes
            self.end_headers()
            self.close_connection = True
            head = {"id": _new_id(chat), "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()), "model": server.name}

            def send(choices, **extra):
                self.wfile.write(f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n".encode())
                self.wfile.flush()

            def choice(i, text, finish=None, first=False):
                if not chat:
                    return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}

            if chat:
                send([choice(i, "", first=True) for i in range(len(reqs))])
            done: dict[int, Completion] = {}
            while len(done) < len(reqs):
                index, kind, payload = events.get()
                if kind == "error":
                    self.wfile.write(f"data: {json.dumps(ApiError(500, payload).body())}\n\n".encode())
                    break
                if kind == "text":
                    send([choice(index, payload)])
                else:
                    done[index] = payload
                    send([choice(index, "", payload.finish_reason)])
            if (body.get("stream_options") or {}).get("include_usage") and len(done) == len(reqs):
                send([], usage=_usage(done, chat))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def _usage(done: dict[int, Completion], chat: bool) -> dict:
    """OpenAI's usage block: a chat request has one prompt (its n choices share it), a completions request
    may have several."""
    prompt_tokens = done[0].prompt_tokens if chat else sum(c.prompt_tokens for c in done.values())
    completion_tokens = sum(c.completion_tokens for c in done.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def serve(model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          served_name: str | None = None, api_key: str | None = None, max_tokens: int = 512, dtype: str = "auto",
          engine: str = "auto", on_ready=None) -> None:
    """Load a model on `engine` (see `engines.open_model`) and serve it until interrupted. `on_ready(server)`
    runs once it listens."""
    from slmkit.engines import open_model

    loaded = open_model(model, engine, dtype=dtype)
    try:
        server = Server(loaded, host=host, port=port, max_batch=max_batch, served_name=served_name,
                        api_key=api_key, max_tokens=max_tokens)
    except OSError as e:
        raise SlmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    if on_ready:
        on_ready(server)
    server.serve_forever()
