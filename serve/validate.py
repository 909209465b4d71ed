"""Check a generation request before anything else sees it.

The gateway parses each body once (it has to rewrite ``model``), so it checks the
fields it knows on the way: JSON that is an object, nested at most ``MAX_DEPTH``
levels, numbers Python can read (an integer of 5,000 digits is refused, not a 500),
the required fields, the type of every known field, ``max_tokens`` within 1..context,
``n`` within 1..--max-n. Fields it does not know pass
through to vLLM, which validates them itself and answers 400 in the same format.
A prompt plus ``max_tokens`` beyond the context is the engine's to refuse: only it
knows the prompt's length in tokens.
"""

from __future__ import annotations

import json
from typing import Any

from lorabay.serve.errors import InvalidRequest
from lorabay.serve.options import DEFAULT_MAX_N

CHAT = "chat/completions"
COMPLETIONS = "completions"
MAX_DEPTH = 64  # deepest JSON nesting a request may have (a tool's JSON schema is ~10)


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


def nesting_depth(value, limit: int) -> int:
    """How deep ``value`` nests, counting up to ``limit + 1`` at most (iteratively: a
    deep value must not exhaust the stack here either)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(raw: bytes) -> Any:
    """JSON, or InvalidRequest: malformed, nested too deep, or a number Python refuses."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:  # int() of more than sys.get_int_max_str_digits() digits
        raise InvalidRequest(f"the body has a number it cannot read: {error}") from None
    if nesting_depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidRequest(f"the body nests deeper than {MAX_DEPTH} levels")
    return value


def parse_request(
    raw: bytes, endpoint: str, max_model_len: int | None, max_n: int = DEFAULT_MAX_N
) -> dict[str, Any]:
    """The request body as a dict, or :class:`InvalidRequest` naming the first bad field."""
    body = parse_json(raw)
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
    n = body.get("n")
    if n is not None and n < 1:
        raise InvalidRequest(f"'n' must be at least 1, got {n}", param="n")
    if n is not None and n > max_n:
        raise InvalidRequest(
            f"'n' is {n}, above this server's limit of {max_n} choices per request (--max-n)",
            param="n",
        )
    return body
