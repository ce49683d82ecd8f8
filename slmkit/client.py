"""The "large model" role: wherever a method needs a teacher or a black-box LLM it takes a local model or an
OpenAI-compatible endpoint, written `http://host:port/v1#model-name` (the part after `#` picks the model;
without it the server's first model is used). `open_lm(spec)` returns either kind behind one interface:
`lm.generate(prompts, params, system=...) -> list[str]` and `lm.choose(prompts, options) -> list[int | None]`
(which option each prompt continues with: scored by log-likelihood locally, read from greedy text remotely).

The endpoint client uses only the standard library: JSON over HTTP with a timeout per request, retries
with exponential back-off on connection failures, 429 and 5xx, and a one-line error for anything else.
The API key comes from `--api-key`, `SLMKIT_API_KEY` or `OPENAI_API_KEY`.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from slmkit.errors import SlmError
from slmkit.generate import SamplingParams, with_system


def is_endpoint(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(("http://", "https://"))


@dataclass
class Endpoint:
    """An OpenAI-compatible server."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 0.5

    @classmethod
    def parse(cls, spec: str, **kwargs) -> Endpoint:
        """`http://host:port/v1#model` -> Endpoint(base_url, model)."""
        url, _, model = spec.partition("#")
        url = url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        key = kwargs.pop("api_key", None) or os.environ.get("SLMKIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return cls(url, model or None, key, **kwargs)

    def __str__(self) -> str:
        return f"{self.base_url}#{self.model}" if self.model else self.base_url

    def request(self, path: str, body: dict | None = None) -> dict:
        """GET (no body) or POST JSON; retry what may succeed later; raise SlmError otherwise."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.base_url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in (408, 429) and e.code < 500 or attempt == self.retries:
                    raise SlmError(f"{self.base_url}{path}: HTTP {e.code}: {message}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                if attempt == self.retries:
                    reason = getattr(e, "reason", e)
                    raise SlmError(f"{self.base_url}{path}: cannot reach the endpoint ({reason}) after "
                                   f"{self.retries + 1} attempts") from None
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def models(self) -> list[str]:
        return [m["id"] for m in self.request("/models").get("data", [])]

    def model_name(self) -> str:
        if not self.model:
            names = self.models()
            if not names:
                raise SlmError(f"{self.base_url} lists no models; name one as {self.base_url}#MODEL")
            self.model = names[0]
        return self.model

    def chat(self, messages: list[dict], params: SamplingParams) -> str:
        body = {"model": self.model_name(), "messages": messages, **_sampling_body(params)}
        choice = self.request("/chat/completions", body)["choices"][0]
        return choice["message"]["content"] or ""

    def complete(self, prompt: str, params: SamplingParams) -> str:
        body = {"model": self.model_name(), "prompt": prompt, **_sampling_body(params)}
        return self.request("/completions", body)["choices"][0]["text"]


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return e.reason or "error"


def _sampling_body(params: SamplingParams) -> dict:
    body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.top_k:
        body["top_k"] = params.top_k  # vLLM and slmkit servers accept these two
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    return body


class LocalLM:
    """A model loaded in this process."""

    def __init__(self, loaded, batch_size: int = 8):
        self.loaded, self.batch_size, self.name = loaded, batch_size, loaded.name

    def generate(self, prompts: list[str | list[dict]], params: SamplingParams, *, system: str | None = None,
                 chat: bool | None = None) -> list[str]:
        from slmkit.generate import generate

        texts = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            texts += [c.text for c in generate(self.loaded, batch, params, system=system, chat=chat)]
        return texts

    def choose(self, prompts: list[str], options: list[str]) -> list[int | None]:
        """The option with the highest log p(option | prompt) (plain-text prompts)."""
        from slmkit.evaluate import best_option

        return [best_option(self.loaded, prompt, options) for prompt in prompts]


class RemoteLM:
    """An endpoint; prompts go out concurrently so the server can batch them."""

    def __init__(self, endpoint: Endpoint, concurrency: int = 8):
        self.endpoint, self.concurrency, self.name = endpoint, concurrency, str(endpoint)

    def generate(self, prompts: list[str | list[dict]], params: SamplingParams, *, system: str | None = None,
                 chat: bool | None = None) -> list[str]:
        def one(i_prompt):
            i, prompt = i_prompt
            p = SamplingParams(**{**params.__dict__, "seed": None if params.seed is None else params.seed + i})
            if chat is False:
                return self.endpoint.complete(prompt, p)
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.endpoint.chat(with_system(messages, system), p)

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, enumerate(prompts)))

    def choose(self, prompts: list[str], options: list[str]) -> list[int | None]:
        """Greedy completions, read as the option they start with (None when they name no option). An
        endpoint gives no log-likelihoods, so the answer is parsed from text."""
        texts = self.generate(prompts, SamplingParams(max_new_tokens=16, stop=["\n"]), chat=False)
        return [match_option(t, options) for t in texts]


def match_option(text: str, options: list[str]) -> int | None:
    """The option a reply starts with (case-insensitive, ignoring a leading bullet), else the option it
    mentions first as a whole word, else None."""
    import re

    reply = re.sub(r"^[\s\-*•:]+", "", text).lower()
    by_length = sorted(range(len(options)), key=lambda i: -len(options[i]))  # "positive" before "pos"
    for i in by_length:
        option = options[i].strip().lower()
        if reply.startswith(option) and not reply[len(option):len(option) + 1].isalnum():
            return i
    mentions = [(m.start(), i) for i in by_length
                if (m := re.search(r"(?<!\w)" + re.escape(options[i].strip().lower()) + r"(?!\w)", reply))]
    return min(mentions)[1] if mentions else None


def open_lm(spec: str | None, *, dtype: str = "auto", api_key: str | None = None, timeout: float = 120.0):
    """A local model (zoo name, directory, .gguf, hub id; default the embedded model) or an endpoint."""
    if is_endpoint(spec):
        return RemoteLM(Endpoint.parse(spec, api_key=api_key, timeout=timeout))
    from slmkit.models import load

    return LocalLM(load(spec, dtype=dtype))
