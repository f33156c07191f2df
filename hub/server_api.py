"""The request/response side of ``adapterhub serve``: parsing and validating OpenAI-style bodies, errors, replies.

Nothing here touches the model: :func:`parse_completion` turns a JSON body into a :class:`CompletionParams`
(or raises :class:`ApiError`), :func:`completion_object` shapes the OpenAI ``text_completion`` reply and
:func:`truncate_at_stop` applies ``stop`` strings (the stop text itself is not returned, as in OpenAI's API).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_PROMPTS = 64  # prompts in one request (a list prompt gives one choice per prompt)
MAX_STOP = 4  # stop strings per request, as in OpenAI's API
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "code", "param"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, "not_found_error", code, param)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, else a 400 saying what is wrong with it (and where)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8 ({exc.reason} at byte {exc.start})",
                          code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(body)}", code="invalid_json")
    return body


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad_request(f"'{key}' must be an integer, not {_kind(value)}", param=key)
    if value < lo or (hi is not None and value > hi):
        limit = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"'{key}' must be {limit}, got {value}", param=key)
    return value


def _float(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{key}' must be a number, not {_kind(value)}", param=key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise bad_request(f"'{key}' must be {'above' if lo_open else 'at least'} {lo:g} and at most {hi:g}, "
                          f"got {value:g}", param=key)
    return float(value)


@dataclass
class CompletionParams:
    """A validated ``/v1/completions`` request: ``prompts`` are strings or token-id lists (one choice each)."""

    model: str
    prompts: list[str | list[int]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    return_token_ids: bool = False  # extension (as in vLLM): each choice also carries its "token_ids"


def _prompts(value: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in value):
            return [list(p) for p in value]
        raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                          "token-id lists (not a mixture)", param="prompt")
    if isinstance(value, list):
        raise bad_request("'prompt' is an empty list", param="prompt")
    raise bad_request(f"'prompt' must be a string or a list of strings, not {_kind(value)}", param="prompt")


_UNSUPPORTED = {"stream": (False, None), "echo": (False, None), "logprobs": (None,), "suffix": (None,),
                "n": (1, None), "best_of": (1, None)}


def parse_completion(body: dict[str, Any]) -> CompletionParams:
    """Validate a ``/v1/completions`` body. Unknown fields (``user``, ``presence_penalty`` ...) are ignored;
    features this server lacks (streaming, ``n`` > 1, ``logprobs``, ``echo``, ``suffix``) are a 400."""
    model = body.get("model")
    if model is None:
        raise bad_request("'model' is missing: name an adapter (see GET /v1/models) or the base model",
                          param="model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"'model' must be a non-empty string, not {_kind(model)}", param="model")
    if "prompt" not in body:
        raise bad_request("'prompt' is missing", param="prompt")
    prompts = _prompts(body["prompt"])
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    for key, allowed in _UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise bad_request(f"'{key}'={json.dumps(body[key])} is not supported by adapterhub serve",
                              param=key, code="unsupported")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request(f"'stop' must be a string or a list of strings, not {_kind(stop)}", param="stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise bad_request("'stop' strings must not be empty", param="stop")
    token_ids = body.get("return_token_ids", False)
    if not isinstance(token_ids, bool):
        raise bad_request(f"'return_token_ids' must be a boolean, not {_kind(token_ids)}", param="return_token_ids")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"'seed' must be an integer, not {_kind(seed)}", param="seed")
    return CompletionParams(model=model, prompts=prompts,
                            max_tokens=_int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1),
                            temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), seed=seed, stop=stops,
                            return_token_ids=token_ids)


def parse_adapter_load(body: dict[str, Any]) -> tuple[str, str | None]:
    """``POST /v1/adapters``: ``{"source": str, "name": str (optional)}``."""
    source, name = body.get("source"), body.get("name")
    if not isinstance(source, str) or not source:
        what = "missing" if source is None else f"{_kind(source)}, not a non-empty string"
        raise bad_request(f"'source' is {what}: give a store reference (name@v2) or a bundle directory",
                          param="source")
    if name is not None and (not isinstance(name, str) or not name):
        raise bad_request(f"'name' must be a non-empty string, not {_kind(name)}", param="name")
    return source, name


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def completion_object(model: str, choices: list[tuple[str, str, list[int] | None]], prompt_tokens: int,
                      completion_tokens: int) -> dict[str, Any]:
    """OpenAI's ``text_completion`` object; ``choices`` are ``(text, finish_reason, token_ids or None)`` in
    prompt order (``token_ids`` only when the request asked for them)."""
    out = []
    for i, (text, reason, ids) in enumerate(choices):
        out.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        if ids is not None:
            out[-1]["token_ids"] = ids
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": out,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def model_entry(model_id: str, created: int, root: str, parent: str | None = None) -> dict[str, Any]:
    """One entry of OpenAI's model list (``root``: the base model; ``parent``: what an alias stands for)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "adapterhub", "root": root,
            "parent": parent}
