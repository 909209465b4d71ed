"""Measure a policy on records in the training shapes: greedy answers and preference margins.

Tests use these to show an adapter learned its task (held-out prompts answered right,
the chosen answer's log-probability above the rejected one's); the demo uses them
to print answers side by side.

    model, tokenizer = load_policy_for_eval("tiny", "runs/sft/adapter")
    greedy_answers(model, tokenizer, heldout)    # ["positive", ...]
    preference_margin(model, tokenizer, pairs)   # mean log p(chosen) - log p(rejected)
"""

from __future__ import annotations

import os

from lorabay.train.verifier import end_token_ids


def load_policy_for_eval(
    base: str | os.PathLike, adapter: str | os.PathLike | None = None, quantize: str = "none"
):
    """(model, tokenizer) in eval mode: the base, with ``adapter`` applied when given."""
    from lorabay.train.model import load_adapter, load_base

    model, tokenizer = load_base(base, quantize)
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=False)
    return model.eval(), tokenizer


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt: text as is, a message list through the chat template."""
    if isinstance(prompt, list):
        return list(
            tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
    return tokenizer(prompt)["input_ids"]


def record_prompt(record: dict):
    """The prompt of an SFT or preference record, and its reference answer (or None)."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]
    completion = record.get("completion", record.get("chosen"))
    if isinstance(completion, list):
        completion = completion[-1]["content"]
    return record["prompt"], completion


def greedy_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 12) -> list[str]:
    """The greedy completion of each record's prompt, decoded without special tokens, stripped."""
    import torch

    stops = end_token_ids(tokenizer)
    answers = []
    with torch.no_grad():
        for record in records:
            prompt, _ = record_prompt(record)
            ids = torch.tensor([prompt_ids(tokenizer, prompt)])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            answers.append(
                tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
            )
    return answers


def completion_logprob(model, tokenizer, prompt, completion) -> float:
    """log p(completion | prompt) under ``model``, summed over the completion's tokens.

    Chat records are rendered with the chat template, the completion closed by its
    end-of-turn token, exactly as DPO training sees them.
    """
    import torch

    if isinstance(prompt, list):
        head = prompt_ids(tokenizer, prompt)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    else:
        head = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    full = list(full)
    start = len(head)
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # (1, T, vocab)
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)  # (T-1, vocab): predicts tokens 1..T-1
    targets = ids[0, 1:]  # (T-1,)
    picked = logprobs.gather(1, targets[:, None])[:, 0]  # (T-1,)
    return float(picked[start - 1 :].sum())


def preference_margin(model, tokenizer, pairs: list[dict]) -> float:
    """Mean over ``pairs`` of log p(chosen) - log p(rejected) given the prompt."""
    margins = [
        completion_logprob(model, tokenizer, pair["prompt"], pair["chosen"])
        - completion_logprob(model, tokenizer, pair["prompt"], pair["rejected"])
        for pair in pairs
    ]
    return sum(margins) / len(margins)
