"""What an ``adapter_config.json`` must hold to be served: checked at push, every problem at once.

PEFT and vLLM read these fields when an adapter is loaded; a value they cannot use
would otherwise pass the push and fail every request for the adapter (an invalid
``target_modules`` regex is a 500 on each one). So a push refuses, with one line:

- a file over ``MAX_CONFIG_BYTES``, or nested deeper than ``MAX_DEPTH`` (PEFT's configs
  are flat; 5,000 levels blow Python's recursion limit in ``json``), or an integer too long
  for ``int()`` (Python refuses over 4,300 digits);
- ``r`` that is not a whole number from 1 to ``MAX_RANK``; ``lora_alpha`` missing or not a
  finite number (vLLM requires it);
- ``target_modules`` that is neither a list of module names nor a valid regular
  expression (PEFT: a string is a regex matched against each full module name);
- ``rank_pattern``/``alpha_pattern`` keys that are not valid regular expressions (PEFT
  and vLLM match ``(.*\\.)?(KEY)$``), ranks that are not whole numbers from 1 to
  ``MAX_RANK``, alphas that are not finite numbers;
- ``modules_to_save`` that is not a list of names.

    problems = config_problems(config)     # [] when it can be served
"""

from __future__ import annotations

import math
import re

MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_RANK = 1 << 16  # far above any engine's --max-lora-rank; bounds what a manifest records
MAX_PATTERN = 1000  # module-name regexes are short; a long one is a mistake or an attack


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (is_whole(value) or isinstance(value, float)) and math.isfinite(value)


def nesting_depth(value) -> int:
    """How deep lists and objects nest in ``value`` (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:  # past the bound the answer is known: stop walking
            stack.extend((child, depth + 1) for child in items)
    return deepest


def module_pattern(pattern: str) -> str:
    """PEFT's reading of a ``rank_pattern``/``alpha_pattern`` key: a regular expression
    matched against the end of a module's name (peft.utils.other.get_pattern_key)."""
    return rf"(.*\.)?({pattern})$"


def regex_problem(pattern: str, field: str) -> str | None:
    if not isinstance(pattern, str):
        return f"{field} {short(pattern)} is not a string"
    if len(pattern) > MAX_PATTERN:
        return f"{field} is {len(pattern)} characters long; patterns have at most {MAX_PATTERN}"
    try:
        re.compile(module_pattern(pattern))
    except (re.error, RecursionError, OverflowError) as error:
        return f"{field} {short(pattern)} is not a valid regular expression ({error})"
    return None


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def rank_problem(value, field: str) -> str | None:
    if not is_whole(value) or not 1 <= value <= MAX_RANK:
        return f"{field} is {short(value)}, not a whole number from 1 to {MAX_RANK}"
    return None


def pattern_problems(config: dict, field: str, check_value) -> list[str]:
    table = config.get(field)
    if table is None:
        return []
    if not isinstance(table, dict):
        return [f"{field} is {short(table)}, not an object of pattern -> value"]
    problems = []
    for key, value in table.items():
        problems += [p for p in (regex_problem(key, f"{field} key"),) if p]
        problems += [p for p in (check_value(value, f"{field}[{short(key)}]"),) if p]
    return problems


def alpha_problem(value, field: str) -> str | None:
    if not is_number(value):
        return f"{field} is {short(value)}, not a finite number"
    return None


def config_problems(config: dict) -> list[str]:
    """Every reason ``config`` (a parsed adapter_config.json) cannot be served; [] if none."""
    depth = nesting_depth(config)
    if depth > MAX_DEPTH:
        return [f"it nests deeper than {MAX_DEPTH} levels (PEFT configs are flat)"]
    problems = [p for p in (rank_problem(config.get("r"), "r"),) if p]
    if "lora_alpha" not in config:
        problems.append("lora_alpha is missing (vLLM needs it; PEFT's save_pretrained writes it)")
    else:
        problems += [p for p in (alpha_problem(config["lora_alpha"], "lora_alpha"),) if p]
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not targets:
            problems.append("target_modules is an empty string")
        else:
            problems += [p for p in (regex_problem(targets, "target_modules"),) if p]
    elif isinstance(targets, list) and targets:
        odd = [t for t in targets if not isinstance(t, str) or not t]
        if odd:
            problems.append(f"target_modules holds {short(odd[0])}, not a module name")
    else:
        problems.append("target_modules is missing or empty (set LoraConfig(target_modules=...))")
    problems += pattern_problems(config, "rank_pattern", rank_problem)
    problems += pattern_problems(config, "alpha_pattern", alpha_problem)
    saved = config.get("modules_to_save")
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)
    ):
        problems.append(f"modules_to_save is {short(saved)}, not a list of module names")
    return problems
