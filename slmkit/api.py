"""The OpenAI API's request and response shapes, apart from HTTP: a request's fields checked and turned into
sampling settings within the server's `Limits`, image content parts into pictures, and the usage block and ids of
a response. Every problem is an `ApiError` naming the field (OpenAI's `param`). The HTTP server is `serve.py`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from slmkit.data.records import RecordError
from slmkit.errors import ApiError, SlmError
from slmkit.generate import Completion, SamplingParams


@dataclass
class Limits:
    """What one client may ask of the server."""

    max_tokens: int = field(default=512, metadata={"help": "Tokens generated when a request gives no max_tokens."})
    max_tokens_cap: int = field(default=4096, metadata={"help": "Most tokens a request may ask for (also capped "
                                                                "to the model's context)."})
    max_body_bytes: int = field(default=8 << 20, metadata={"help": "Largest request body (413 beyond it, before "
                                                                   "reading it); images travel inside it."})
    max_prompts: int = field(default=16, metadata={"help": "Most completions per request (prompts x n)."})
    max_queue: int = field(default=256, metadata={"help": "Requests waiting for a batch row; more get 429 with "
                                                          "Retry-After."})
    timeout: float = field(default=600.0, metadata={"help": "Wall-time per request in seconds (504 after it)."})
    max_connections: int = field(default=512, metadata={"help": "Open connections; more get 503."})
    read_timeout: float = field(default=60.0, metadata={"help": "Seconds a client may stay silent while sending "
                                                                "a request before it is dropped."})


def number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if (low is not None and value < low) or (high is not None and value > high) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be between {low} and {high} (got {value})", name)
    return kind(value)


def sampling_from(body: dict, limits: Limits) -> SamplingParams:
    """OpenAI request fields (plus vLLM's top_k, repetition_penalty, ignore_eos) -> SamplingParams."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported; use 'repetition_penalty'", name)
    if body.get("logprobs"):
        raise ApiError(400, "'logprobs' is not supported by this server", "logprobs")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings of up to 256 "
                            "characters", "stop")
    temperature = number(body, "temperature", 1.0, float, 0, 2)
    top_p = number(body, "top_p", 1.0, float, 0, 1)
    if top_p == 0:  # "only the likeliest token" is greedy decoding
        temperature, top_p = 0.0, 1.0
    for flag in ("stream", "ignore_eos"):
        if not isinstance(body.get(flag, False), bool):
            raise ApiError(400, f"'{flag}' must be true or false", flag)
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return SamplingParams(
        max_new_tokens=number(body, name, min(limits.max_tokens, limits.max_tokens_cap), int, 1,
                               limits.max_tokens_cap),
        temperature=temperature,
        top_p=top_p,
        top_k=max(number(body, "top_k", 0, int, -1, 1 << 30), 0),
        repetition_penalty=number(body, "repetition_penalty", 1.0, float, 0.01, 100),
        seed=number(body, "seed", None, int, -(1 << 62), 1 << 62),
        ignore_eos=body.get("ignore_eos", False),
        stop=stop,
    )


def image_part(images: list | None):
    """A `records.check_message` hook: an image_url content part (a base64 data URL) becomes IMAGE_TOKEN in the
    text and its picture is appended to `images` (None: the model takes no images)."""

    def convert(part: dict, where: str) -> str:
        from slmkit.engines import IMAGE_TOKEN, read_image

        if part.get("type") != "image_url":
            raise RecordError(where, "a content part must be text or image_url", where)
        if images is None:
            raise RecordError(where, "this model does not take images", where)
        url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
        if not isinstance(url, str):
            raise RecordError(where, "an image_url part needs {\"url\": \"data:image/png;base64,...\"}", where)
        try:
            images.append(read_image(url))
        except SlmError as e:
            raise RecordError(where, str(e), where) from e
        return IMAGE_TOKEN + "\n"

    return convert


def usage(done: dict[int, Completion], chat: bool) -> dict:
    """OpenAI's usage block: a chat request has one prompt (its n choices share it), a completions request
    may have several."""
    prompt_tokens = done[0].prompt_tokens if chat else sum(c.prompt_tokens for c in done.values())
    completion_tokens = sum(c.completion_tokens for c in done.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
