"""SFT on the real base (SmolLM2-135M-Instruct) learns held-out tasks, from every data shape.

Each run trains a short LoRA or QLoRA on one of train/tasks.py's tasks and answers held-out
prompts (never trained on) greedily with transformers + PEFT; the base alone, asked the
same, does not do the task. ``messages`` records go through the model's own chat template,
which has no ``{% generation %}`` markers (train/data.py's tokenize_conversations).
"""

from __future__ import annotations

import pytest

from lorabay.train.tasks import check_answer, heldout_questions, text_prompt, write_task

pytestmark = pytest.mark.slow

HELDOUT = 8


def answers(base, adapter, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers, batched; ``prompts`` are already rendered (template or plain text)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def pulled_as_named_base(real_base):
    """The session's pulled base where `--base smollm2-135m-instruct` looks for it."""
    from lorabay.hub.bases import pulled_path

    target = pulled_path("smollm2-135m-instruct")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(real_base, target_is_directory=True)
    return "smollm2-135m-instruct"


def test_plan_prints_the_real_table(real_base):
    import json

    from click.testing import CliRunner

    from lorabay.cli.main import cli

    name = pulled_as_named_base(real_base)
    result = CliRunner().invoke(cli, ["plan", "--base", name, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["base_parameters"] == 134_515_008
    assert (plan["layers"], plan["adapted_modules"]) == (30, 60)  # q_proj, v_proj in 30 layers


def rendered(base, questions: list[str], shape: str) -> list[str]:
    from transformers import AutoTokenizer

    if shape == "text":
        return [text_prompt(q) for q in questions]
    tokenizer = AutoTokenizer.from_pretrained(base)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def right(task: str, questions: list[str], replies: list[str], shape: str) -> int:
    if shape == "text":  # a plain-text completion runs on past its answer: take the first line
        replies = [r.strip().splitlines()[0] if r.strip() else "" for r in replies]
    return sum(check_answer(task, q, r)["right"] for q, r in zip(questions, replies, strict=True))


@pytest.mark.timeout(1800)  # ~2 min each on a quiet 2-core machine; much longer when shared
@pytest.mark.parametrize(
    "task, shape, quantize, targets",
    [
        ("extract", "messages", "none", "all-linear"),
        ("sentiment", "chat", "nf4", "q_proj,v_proj"),
        ("sentiment", "text", "nf4", "q_proj,v_proj"),
    ],
)
def test_sft_learns_a_held_out_task_on_the_real_base(
    real_base, tmp_path, task, shape, quantize, targets
):
    from lorabay.train.config import SFTConfig, build_config
    from lorabay.train.sft import train_sft

    name = pulled_as_named_base(real_base)
    files = write_task(task, tmp_path / "data", train=256, heldout=HELDOUT, shape=shape)
    config = build_config(
        SFTConfig,
        files["sft-recipe"],
        {
            "base": name,  # the pulled base's name, as a user would write it
            "output": str(tmp_path / "run"),
            "quantize": quantize,
            "targets": targets,
            "max_steps": 30,
            "lr": 1e-3,
            "push": f"real/{task}-{shape}",
        },
    )
    result = train_sft(config, show_progress=False)
    # The registry names the real base and where its weights came from, not a folder.
    assert result.manifest.base["id"] == "smollm2-135m-instruct"
    assert result.manifest.base["source"]["kind"] == "packaged"
    questions = heldout_questions(task, HELDOUT)
    prompts = rendered(real_base, questions, shape)
    learned = right(task, questions, answers(real_base, result.adapter, prompts), shape)
    untrained = right(task, questions, answers(real_base, None, prompts), shape)
    assert learned >= HELDOUT - 1, (learned, untrained)
    assert untrained <= 2, untrained
