"""Check a generation request before anything else sees it.

The gateway parses each body once (it has to rewrite ``model``), so it checks the
fields it knows on the way: JSON that is an object, the required fields, the type
of every known field, ``max_tokens`` within 1..context. Fields it does not know pass
through to vLLM, which validates them itself and answers 400 in the same format.
A prompt plus ``max_tokens`` beyond the context is the engine's to refuse: only it
knows the prompt's length in tokens.
"""

from __future__ import annotations

import json
from typing import Any

from lorabay.hub.errors import InvalidRequest

CHAT = "chat/completions"
COMPLETIONS = "completions"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_prompt(value) -> bool:
    # str | list[str] | list[int] (token ids) | list[list[int]]
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(v, str) for v in value) or all(_is_int(v) for v in value):
        return True
    return all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value)


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)
    )


# field -> (check, the type as the error names it); None is always allowed for optional fields.
COMMON_FIELDS = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "max_tokens": (_is_int, "an integer"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "n": (_is_int, "an integer"),
    "seed": (_is_int, "an integer"),
    "stop": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "presence_penalty": (_is_number, "a number"),
    "frequency_penalty": (_is_number, "a number"),
    "user": (lambda v: isinstance(v, str), "a string"),
}
ENDPOINT_FIELDS = {
    CHAT: {
        "messages": (_is_messages, "a non-empty list of {role, content} objects"),
        "max_completion_tokens": (_is_int, "an integer"),
        "logprobs": (lambda v: isinstance(v, bool), "a boolean"),
        "top_logprobs": (_is_int, "an integer"),
    },
    COMPLETIONS: {
        "prompt": (_is_prompt, "a string, a list of strings or a list of token ids"),
        "logprobs": (_is_int, "an integer"),
        "echo": (lambda v: isinstance(v, bool), "a boolean"),
        "suffix": (lambda v: isinstance(v, str), "a string"),
    },
}
REQUIRED = {CHAT: ("model", "messages"), COMPLETIONS: ("model", "prompt")}


def parse_request(raw: bytes, endpoint: str, max_model_len: int | None) -> dict[str, Any]:
    """The request body as a dict, or :class:`InvalidRequest` naming the first bad field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    for field in REQUIRED[endpoint]:
        if body.get(field) is None:
            raise InvalidRequest(f"'{field}' is required", param=field)
    fields = {**COMMON_FIELDS, **ENDPOINT_FIELDS[endpoint]}
    for field, value in body.items():
        if field in fields and value is not None:
            check, wanted = fields[field]
            if not check(value):
                raise InvalidRequest(
                    f"'{field}' must be {wanted}, got {json.dumps(value)[:60]}", param=field
                )
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if value < 1:
            raise InvalidRequest(f"'{field}' must be at least 1, got {value}", param=field)
        if max_model_len is not None and value > max_model_len:
            raise InvalidRequest(
                f"'{field}' is {value}, beyond the model's context of {max_model_len} tokens",
                param=field,
            )
    if body.get("n") is not None and body["n"] < 1:
        raise InvalidRequest(f"'n' must be at least 1, got {body['n']}", param="n")
    return body
