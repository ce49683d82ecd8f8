"""An OpenAI-compatible HTTP server over any model slmkit loads: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`, streaming by server-sent events, OpenAI-style errors.

Requests are generated together by the continuous-batching engine (`batching.py`). The HTTP side is the standard
library's threading server: a handler thread per connection parses the request, submits it to the engine and
relays the engine's events. No web framework is needed.

It is a public surface, so every limit a client could push on is set in `api.Limits` (each a `slm serve` flag): the
body is refused by its declared size before it is read, a request's tokens and prompts are capped, the queue is
bounded (429 with Retry-After when full), every request has a wall-time; the work of a client that goes away
stops, streaming or not; any failure is answered as an OpenAI-shaped JSON error; SIGTERM and SIGINT stop the
server within seconds, closing the streams in flight with an error event and `[DONE]`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from slmkit import pages
from slmkit.api import Limits, image_part, new_id, number, sampling_from, usage
from slmkit.batching import engine_for
from slmkit.data.records import RecordError, check_messages
from slmkit.errors import ApiError, SlmError
from slmkit.generate import Completion, format_prompt, is_chat_model, takes_images
from slmkit.train import RUNS_DIR


class ClientGone(Exception):
    """The client closed its connection: its requests are cancelled and nothing is sent."""


class Server:
    """The HTTP server: `Server(loaded).start()` serves in the background (tests, notebooks); `serve()` below
    blocks until a signal (the CLI)."""

    def __init__(self, loaded, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
                 served_name: str | None = None, api_key: str | None = None, limits: Limits | None = None,
                 runs_dir: Path = RUNS_DIR):
        """`loaded=None` serves only the pages and runs (`slm dashboard`): no model, no engine."""
        self.loaded, self.api_key, self.limits, self.runs_dir = loaded, api_key, limits or Limits(), Path(runs_dir)
        self.name = served_name or (loaded.name if loaded else None)
        self.engine = engine_for(loaded, max_batch=max_batch, max_queue=self.limits.max_queue) if loaded else None
        self.stopping = threading.Event()
        self.active = 0  # requests being answered
        self._lock = threading.Lock()
        self.httpd = _HTTPServer((host, port), _handler_for(self), self.limits.max_connections)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="slmkit-http", daemon=True)
        self._thread.start()
        return self

    def close(self, grace: float = 3.0) -> None:
        """Stop accepting, end the requests in flight (streams get an error event and [DONE]) within `grace`
        seconds, stop the engine."""
        self.stopping.set()
        if self._thread:
            self.httpd.shutdown()
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        self.httpd.server_close()
        if self.engine:
            self.engine.close(timeout=max(0.5, deadline - time.monotonic()))

    def log(self, message: str) -> None:
        print(f"slmkit serve: {message}", file=sys.stderr, flush=True)

    # Endpoints --------------------------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "slmkit", "slmkit": {"images": takes_images(self.loaded)}}]
                if self.loaded else []}

    def health(self) -> dict:
        status = {"status": "stopping" if self.stopping.is_set() else "ok", "active_requests": self.active}
        if not self.engine:
            return {**status, "engine": None}
        return {**status, "engine": self.engine_name, "waiting": self.engine.waiting.qsize(), **self.engine.stats}

    @property
    def engine_name(self) -> str:
        return getattr(self.loaded.engine, "name", "torch")

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest((header or "").encode("utf-8", "surrogateescape"), expected)

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model not in (None, "", self.name, self.loaded.name):
            raise ApiError(404, f"The model '{str(model)[:100]}' does not exist; this server serves '{self.name}'",
                           "model", "model_not_found")

    def prompts(self, body: dict, chat: bool) -> list[tuple[str, bool, list | None]]:
        """(text, templated, images) per prompt."""
        tok = self.loaded.tokenizer
        if chat:
            images = [] if takes_images(self.loaded) else None
            try:
                messages = check_messages(body.get("messages"), "messages", parts=image_part(images))
            except RecordError as e:
                raise ApiError(400, str(e), e.field) from e
            if not is_chat_model(tok):
                raise ApiError(400, f"{self.name} has no chat template; use /v1/completions", "messages")
            try:
                text = format_prompt(tok, messages, chat=True)
            except Exception as e:  # the template's own checks (e.g. roles must alternate) reject these messages
                raise ApiError(400, f"the model's chat template refused the messages: {str(e)[:200]}",
                               "messages") from e
            return [(text, True, images or None)]
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ApiError(400, "'prompt' must be a string or a list of strings", "prompt")
        return [(p, False, None) for p in prompt]

    def start_request(self, body: dict, chat: bool):
        self.check_model(body)
        n = number(body, "n", 1, int, 1, self.limits.max_prompts)
        params = sampling_from(body, self.limits)
        prompts = self.prompts(body, chat)
        if len(prompts) * n > self.limits.max_prompts:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} is more than the {self.limits.max_prompts} "
                                "completions a request may ask for", "prompt")
        events: queue.Queue = queue.Queue()
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


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, up to `max_connections` (then a 503), and a listen backlog for bursts."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections: int):
        self.max_connections, self.connections = max_connections, 0
        self._count = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._count:
            full = self.connections >= self.max_connections
            self.connections += not full
        if not full:
            return super().process_request(request, client_address)
        body = json.dumps(ApiError(503, "too many open connections; retry shortly").body()).encode()
        try:
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1"
                            b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count:
                self.connections -= 1


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _handler_for(server: Server):
    limits = server.limits

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "slmkit"
        timeout = limits.read_timeout  # a silent client is dropped (the socket's timeout)
        streaming = False  # the response's headers went out as an event stream
        body_read = False  # the request's body was read (else the connection cannot carry another request)

        def log_message(self, format, *args):  # quiet: the CLI prints its own summary
            pass

        def send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):
            """The standard library's own errors (a malformed request line, headers too long, an unknown method)
            in OpenAI's JSON shape."""
            self.close_connection = True
            self.request_version = "HTTP/1.1"  # a malformed request line left it at 0.9, which sends no status line
            try:
                self.send_json(code, ApiError(code, message or self.responses.get(code, ("error",))[0]).body())
            except OSError:
                pass

        def do_GET(self):
            self.guarded(self.get)

        def do_POST(self):
            self.guarded(self.post)

        def guarded(self, work) -> None:
            """Run one request; whatever goes wrong becomes one JSON error (or, mid-stream, an error event)."""
            with server._lock:
                server.active += 1
            self.body_read = self.streaming = False
            try:
                if not server.authorized(self.headers.get("Authorization")) and not self.is_page():
                    raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")
                work()
            except ApiError as e:
                self.fail(e)
            except (ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
            except Exception as e:  # a bug must not drop the connection or kill the server: log it, answer 500
                server.log(f"internal error on {self.command} {self.path[:100]}: {type(e).__name__}: {e}")
                self.fail(ApiError(500, f"internal server error ({type(e).__name__})"))
            finally:
                with server._lock:
                    server.active -= 1

        def fail(self, e: ApiError) -> None:
            if self.command == "POST" and not self.body_read:
                self.close_connection = True
            try:
                if self.streaming:
                    self.wfile.write(f"data: {json.dumps(e.body())}\n\ndata: [DONE]\n\n".encode())
                    self.wfile.flush()
                else:
                    self.send_json(e.status, e.body(), e.headers)
            except OSError:
                self.close_connection = True

        def is_page(self) -> bool:  # the pages' files hold no secrets: they load without the API key
            return self.command == "GET" and pages.is_page(self.path)

        def send_page(self, data: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in pages.HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def get(self):
            page = pages.respond(self.path, server.runs_dir, model=server.loaded is not None)
            if page is not None:
                return self.send_page(*page)
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                return self.send_json(200, server.models())
            if path == "/health":
                return self.send_json(200, server.health())
            raise ApiError(404, f"unknown path {self.path[:100]}")

        def read_body(self) -> dict:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not accepted)")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                raise ApiError(400, "the Content-Length header is not a byte count")
            if length > limits.max_body_bytes:
                self.close_connection = True  # the body is left unread
                raise ApiError(413, f"the request body is {length:,} bytes; this server accepts up to "
                                    f"{limits.max_body_bytes:,}", None, "request_too_large")
            raw = self.rfile.read(length)
            if len(raw) < length:
                raise ClientGone
            self.body_read = True
            try:
                body = json.loads(raw or b"null", parse_constant=_no_constants)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({str(e)[:200]})") from e
            except RecursionError:
                raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            return body

        def post(self):
            path = self.path.split("?")[0].rstrip("/")
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise ApiError(404, f"unknown path {self.path[:100]}")
            if server.stopping.is_set():
                raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})
            if server.engine is None:
                raise ApiError(404, "this server has no model (slm dashboard); start one with slm serve")
            chat = path == "/v1/chat/completions"
            body = self.read_body()
            reqs, events = server.start_request(body, chat)
            try:
                if body.get("stream"):
                    self.stream(reqs, events, chat, body)
                else:
                    self.respond(reqs, events, chat)
            finally:
                for r in reqs:  # whatever ended the response (the client leaving too), its generation stops
                    r.cancelled = True

        def client_gone(self) -> bool:
            """Whether the client closed its end: the socket reads as ended (a request not yet read would show
            as data, which is not an end)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        def events(self, reqs, events):
            """The engine's events for these requests until every one is done or failed; raises when the client
            leaves, the request's wall-time passes or the server stops."""
            deadline, checked, open_ = time.monotonic() + limits.timeout, time.monotonic(), len(reqs)
            while open_:
                try:
                    item = events.get(timeout=0.2)
                except queue.Empty:
                    item = None
                now = time.monotonic()
                if item is None or now - checked > 0.2:
                    checked = now
                    if self.client_gone():
                        raise ClientGone
                    if now > deadline:
                        raise ApiError(504, f"the request ran past this server's {limits.timeout:g} s limit",
                                       None, "timeout")
                    if server.stopping.is_set():
                        raise ApiError(503, "the server is shutting down", None, "shutting_down")
                if item is not None:
                    open_ -= item[1] in ("done", "error")
                    yield item

        def respond(self, reqs, events, chat: bool) -> None:
            done: dict[int, Completion] = {}
            for index, kind, payload in self.events(reqs, events):
                if kind == "error":
                    raise ApiError(500, payload)
                if kind == "done":
                    done[index] = payload
            choices = []
            for i in range(len(reqs)):
                c = done[i]
                choice = {"index": i, "finish_reason": c.finish_reason, "logprobs": None}
                choice.update({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text})
                choices.append(choice)
            self.send_json(200, {"id": new_id(chat), "object": "chat.completion" if chat else "text_completion",
                                 "created": int(time.time()), "model": server.name, "choices": choices,
                                 "usage": usage(done, chat)})

        def stream(self, reqs, events, chat: bool, body: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends when the connection closes
            self.end_headers()
            self.close_connection = self.streaming = True
            head = {"id": new_id(chat), "object": "chat.completion.chunk" if chat else "text_completion",
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
            for index, kind, payload in self.events(reqs, events):
                if kind == "error":
                    raise ApiError(500, payload)
                if kind == "text":
                    send([choice(index, payload)])
                else:
                    done[index] = payload
                    send([choice(index, "", payload.finish_reason)])
            if (body.get("stream_options") or {}).get("include_usage"):
                send([], usage=usage(done, chat))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          served_name: str | None = None, api_key: str | None = None, limits: Limits | None = None,
          dtype: str = "auto", engine: str = "auto", runs_dir: Path = RUNS_DIR, dashboard: bool = False,
          on_ready=None) -> None:
    """Load a model on `engine` (see `engines.open_model`) and serve it, with the pages (the runs dashboard reads
    `runs_dir`), until SIGTERM or SIGINT (Ctrl-C), which stop it within seconds. `dashboard=True` serves the pages
    and runs without a model (`slm dashboard`). `on_ready(server)` runs once it listens."""
    from slmkit.engines import open_model

    stop, loading = threading.Event(), [True]

    def on_signal(*_):
        stop.set()
        if loading[0]:  # interrupt the load (the flag stays set if a C callback swallows the exception)
            raise KeyboardInterrupt

    # set here, not inherited: a shell that starts a job in the background makes it ignore SIGINT
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT) if main}
    server = None
    try:
        loaded = None if dashboard else open_model(model, engine, dtype=dtype)
        try:
            server = Server(loaded, host=host, port=port, max_batch=max_batch, served_name=served_name,
                            api_key=api_key, limits=limits, runs_dir=runs_dir)
        except OSError as e:
            raise SlmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        loading[0] = False
        if stop.is_set():
            raise KeyboardInterrupt
        if not api_key and not _loopback(host):
            server.log(f"warning: listening on {host} without an API key: anyone who reaches this port can "
                       f"{'read the runs' if dashboard else 'use the model'} (set --api-key or SLMKIT_API_KEY)")
        server.start()
        if on_ready:
            on_ready(server)
        while not stop.wait(0.5):
            pass
    finally:
        if server is not None:
            server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
