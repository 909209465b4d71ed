"""Teach a judge a rule a script can check: SFT records in exactly the comparison format
`lorabay label` asks, so a small adapter becomes a judge (tests, benchmarks, or a real
rule you can write down as code but want a model to apply).

Every example is written in both orders, so the judge learns the rule, not a position:
(x as A, y as B) answers "A" when x is better, and (y as A, x as B) answers "B". A pair
the rule does not separate (``x_is_better`` None) is left out: answers drawn at random for
such pairs only add noise (on the tiny base, 45% of such records kept a 300-step judge from
learning anything), and a judge that learned the rule comes out near 0.5 on them once
`label` averages the two orders, so its threshold drops them.

    records = judge_sft_records(constitution, "kind", [(prompt, "warm", "cold", True), ...])
    write_jsonl(records, "judge-sft.jsonl")   # then: lorabay train sft --data judge-sft.jsonl
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from lorabay.train.label.constitution import Constitution, comparison_messages
from lorabay.train.label.judge import ANSWERS


def judge_sft_records(
    constitution: Constitution,
    principle: str,
    examples: Iterable[tuple[object, str, str, bool | None]],
    seed: int = 0,
) -> list[dict]:
    """``{"messages": [user: comparison, assistant: "A" or "B"]}`` records, two per example
    ``(prompt, x, y, x_is_better)`` (one per order), shuffled; ties are left out."""
    chosen = constitution.principle(principle)
    records = []
    for prompt, x, y, x_better in examples:
        if x_better is None:
            continue
        for first, second, first_is_x in ((x, y, True), (y, x, False)):
            answer = ANSWERS[0] if x_better == first_is_x else ANSWERS[1]
            question = comparison_messages(constitution, chosen, prompt, first, second)
            records.append({"messages": [*question, {"role": "assistant", "content": answer}]})
    random.Random(f"judge-{seed}").shuffle(records)
    return records
