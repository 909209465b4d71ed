"""RLHF with PPO, as in InstructGPT, on one base model in memory.

The objective (InstructGPT, arXiv:2203.02155 eq. 2, without the pretraining term;
Ziegler et al., arXiv:1909.08593): for prompts x and responses y sampled from the
policy pi, maximise

    E[ r(x, y) ] - beta * KL( pi(.|x) || pi_ref(.|x) )

where r is the reward model and pi_ref the starting policy. Per response token t
(of T), with the KL estimated on the sampled tokens:

    reward_t = -beta * (log pi_old(y_t) - log pi_ref(y_t))  +  [t = T] * r(x, y)

With ``--reward prm:REF`` the one score at the end becomes dense step rewards: the
token that ends step k of a K-step response gets (p_k - 0.5) / K, p_k being the
process reward model's probability that step k is right (Math-Shepherd's step-by-step
PPO rewards each step's end with the PRM's judgement, arXiv:2312.08935). Centred, a
wrong step costs and a right one pays; divided by K, the return is the mean step
probability minus 0.5, so padding a solution with more steps earns nothing (with raw
p_k a policy learns to add steps). A response without a step is scored -0.5: no
solution is not an empty, perfect one.

Advantages by GAE (Schulman et al., arXiv:1506.02438), V the value head:

    delta_t = reward_t + gamma * V(t+1) - V(t)        (V after the last token = 0)
    A_t     = delta_t + gamma * lambda * A_{t+1}      return_t = A_t + V(t)

then whitened over the batch. PPO (Schulman et al., arXiv:1707.06347) takes
``--ppo-epochs`` passes over each batch of rollouts, one optimizer step per
mini-batch, on

    ratio_t  = pi(y_t) / pi_old(y_t)
    L_policy = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
    L_value  = mean_t 0.5 * max((V_t - return_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - return_t)^2)
    loss     = L_policy + vf_coef * L_value

Everything shares ONE base (PEFT multi-adapter):

- policy: the trained adapter ``default`` (a new LoRA, or a copy of ``--policy``);
- reference: the ``--policy`` adapter frozen as ``ref``, or the base with every
  adapter disabled when the run starts from the base (train/model.py
  ``reference_policy``);
- reward: the reward model's (or PRM's) own adapter loaded as ``judge`` with its
  score head (train/heads.py), switched on only to score; it reads the decoded
  response rendered as it was trained (chat template, or text + EOS);
- value (``--value-model head``, the default): a linear head (hidden -> 1) on the
  policy's final hidden states, detached, so the value loss trains the head alone and
  never pulls on the policy, at no pass of its own. ``--value-model adapter`` is
  InstructGPT's separate value model instead: its own LoRA ``value`` (new, on the same
  base) with the head on its hidden states, trained through its own forward and backward
  pass each update, about twice PPO's update cost (bench/align_bench.py measures both).
  The head is saved in the run folder (``value_head.safetensors``), not in the adapter,
  which serves as any LoRA does.

Logged every ``--logging-steps`` steps (metrics.jsonl, the bar shows reward and kl):
reward, kl (per response, summed over its tokens), entropy (per token), value_loss,
policy_loss, loss, clip_fraction, response_length (tokens); with a PRM also
solution_score (the product of the step probabilities) and steps; and the seconds
a step spent sampling, scoring and updating (time_generate, time_score, time_update).
A closing line holds train_runtime. Rollouts sample plainly at ``--temperature`` (no top-k/top-p), so
they follow the distribution the ratio is computed on.

    lorabay train rlhf --base ./tiny --policy team/sft:1 --reward team/rm:1 \\
        --prompts prompts.jsonl --kl-coef 0.05 --push team/policy
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

from lorabay.train.config import RLHFConfig, reward_source
from lorabay.train.run import RunResult
from lorabay.train.verifier import end_token_ids

JUDGE_ADAPTER = "judge"
VALUE_ADAPTER = "value"
MAX_GRAD_NORM = 1.0  # the transformers Trainer's default, as the SFT/DPO runs use


@dataclass
class Rollouts:
    """A batch of sampled responses. T is the longest response, P the longest prompt."""

    prompts: list  # B prompts (text or message lists)
    sequences: object  # (B, P+T) prompt left-padded, then the response right-padded
    attention_mask: object  # (B, P+T) 1 on prompt tokens and on response tokens
    response_mask: object  # (B, T) float: 1 up to and including the stop token
    texts: list[str]  # B decoded responses, special tokens dropped
    prompt_length: int  # P

    @property
    def responses(self):
        return self.sequences[:, self.prompt_length :]  # (B, T)

    def select(self, rows) -> Rollouts:
        return Rollouts(
            [self.prompts[i] for i in rows.tolist()],
            self.sequences[rows],
            self.attention_mask[rows],
            self.response_mask[rows],
            [self.texts[i] for i in rows.tolist()],
            self.prompt_length,
        )


# ---------------------------------------------------------------- rollouts


def generate_rollouts(
    model,
    tokenizer,
    prompts: list,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    max_length: int = 1024,
) -> Rollouts:
    """Sample one response per prompt from the active adapter (plain sampling at
    ``temperature``, so the tokens follow exactly the distribution the PPO ratio is computed
    on); prompts longer than ``max_length`` tokens keep their end."""
    import torch
    from transformers import GenerationConfig

    from lorabay.train.evaluate import prompt_ids
    from lorabay.train.model import quiet_transformers

    encoded = [prompt_ids(tokenizer, prompt)[-max_length:] for prompt in prompts]
    length = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(encoded):  # left padding: every response starts at column P
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    stops = end_token_ids(tokenizer)
    sampling = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,  # 0 turns top-k off; unset, transformers applies 50
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    # generate() fills every unset option from the base's generation_config.json (a
    # repetition penalty, top-k, ...); with it swapped out, nothing reshapes the samples.
    base = model.get_base_model()
    saved, base.generation_config = base.generation_config, sampling
    try:
        with torch.no_grad(), quiet_transformers():  # "top_k=0 may be ignored": it should be
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=sampling)
    finally:
        base.generation_config = saved
    response = out[:, length:]  # (B, T)
    is_stop = torch.isin(response, torch.tensor(stops, device=device))
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # (B, T) strictly after the first stop
    response_mask = (~after_stop).float()
    texts = [
        tokenizer.decode(row[: int(n)], skip_special_tokens=True)
        for row, n in zip(response, response_mask.sum(1), strict=True)
    ]
    attention = torch.cat([mask, response_mask.long()], dim=1)  # (B, P+T)
    return Rollouts(prompts, out, attention, response_mask, texts, length)


def response_states(model, rollouts: Rollouts):
    """(B, T, H) final hidden states before each response token, under the active adapter."""
    from lorabay.train.heads import decoder_states

    mask = rollouts.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+T) as generate numbers them
    hidden = decoder_states(model, rollouts.sequences, mask, positions)  # (B, P+T, H)
    # The state before response token t sits at column P-1+t.
    return hidden[:, rollouts.prompt_length - 1 : -1]


def policy_forward(model, critic: Critic | None, rollouts: Rollouts, temperature: float):
    """(log-probabilities, entropies, values), each (B, T), of the response tokens under the
    active adapter; values from the critic (None without one)."""
    import torch

    hidden = response_states(model, rollouts)
    logits = model.get_output_embeddings()(hidden).float() / temperature  # (B, T, V)
    logprobs_all = torch.log_softmax(logits, dim=-1)
    logprobs = logprobs_all.gather(-1, rollouts.responses[..., None]).squeeze(-1)  # (B, T)
    entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)  # (B, T)
    values = critic.values(model, rollouts, hidden) if critic else None
    return logprobs, entropy, values


class Critic:
    """V(t) for each response token: a head on the policy's detached hidden states, or
    (``adapter``) a head on the hidden states of the value adapter's own pass."""

    def __init__(self, model, mode: str):
        import torch

        self.own_pass = mode == "adapter"  # a value model of its own, not a head on the policy
        self.head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(next(model.parameters()).device)
        self.adapter_parameters = []
        if self.own_pass:
            previous = model.active_adapter
            model.add_adapter(VALUE_ADAPTER, copy.deepcopy(model.peft_config[previous]))
            model.set_adapter(previous)
            self.adapter_parameters = [
                p for n, p in model.named_parameters() if f".{VALUE_ADAPTER}." in n
            ]

    def parameters(self) -> list:
        return [*self.head.parameters(), *self.adapter_parameters]

    def values(self, model, rollouts: Rollouts, policy_hidden):
        if not self.own_pass:
            return self.head(policy_hidden.detach().float()).squeeze(-1)
        previous = model.active_adapter
        model.set_adapter(VALUE_ADAPTER)
        try:
            hidden = response_states(model, rollouts)
        finally:
            model.set_adapter(previous)
            # set_adapter froze the value adapter again; the update's backward needs its
            # gradients (autograd drops those of a leaf that no longer requires them).
            for parameter in self.adapter_parameters:
                parameter.requires_grad_(True)
        return self.head(hidden.float()).squeeze(-1)


# ---------------------------------------------------------------- rewards


def judge_rewards(judge, kind: str, tokenizer, rollouts: Rollouts):
    """((B, T) reward of each response token from the judge, {metric: value}): a reward
    model's score on the last token, or a PRM's p_k - 0.5 on the token ending step k."""
    import torch

    from lorabay.train.heads import reward_scores, split_steps, step_probabilities

    rewards = torch.zeros_like(rollouts.response_mask)
    lengths = rollouts.response_mask.sum(1).long()  # (B,)
    rows = torch.arange(len(rollouts.texts))
    if kind == "reward":
        scores = reward_scores(judge, tokenizer, rollouts.prompts, rollouts.texts).float()
        rewards[rows, lengths - 1] = scores.to(rewards.device)
        return rewards, {"reward": float(scores.mean())}
    separator = judge.settings["step_separator"]
    steps = [split_steps(text, separator) for text in rollouts.texts]
    probabilities = step_probabilities(judge, tokenizer, rollouts.prompts, steps)
    for row, (response, found) in enumerate(zip(rollouts.responses, probabilities, strict=True)):
        ids = response[: int(lengths[row])].tolist()
        if not found:  # no step is no solution: scored as wrong, not as an empty product
            rewards[row, len(ids) - 1] = -0.5
        ends = step_end_tokens(tokenizer, ids, separator, len(found))
        for end, p in zip(ends, found, strict=True):
            rewards[row, end] += (p - 0.5) / len(found)
    solution = [math.prod(found) if found else 0.0 for found in probabilities]
    totals = rewards.sum(1)
    return rewards, {
        "reward": float(totals.mean()),
        "solution_score": sum(solution) / len(solution),
        "steps": sum(len(s) for s in steps) / len(steps),
    }


def step_end_tokens(tokenizer, ids: list[int], separator: str, count: int) -> list[int]:
    """The response token at which each of its ``count`` steps is complete (its separator
    decoded); a last step without a separator ends at the last token."""
    from lorabay.train.heads import split_steps

    ends: list[int] = []
    for index in range(len(ids)):
        if len(ends) == count:
            break
        text = tokenizer.decode(ids[: index + 1], skip_special_tokens=True)
        done = len(split_steps(text.rpartition(separator)[0], separator))
        ends += [index] * (min(done, count) - len(ends))
    return ends + [len(ids) - 1] * (count - len(ends))


# ---------------------------------------------------------------- PPO


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values, mask):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * (variance + 1e-8).rsqrt() * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """(advantages, returns), each (B, T), by generalized advantage estimation."""
    import torch

    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def policy_objective(logprobs, old_logprobs, advantages, mask, config):
    """(L_policy, clip fraction) of one mini-batch, as the docstring writes them."""
    import torch

    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    clipped = torch.clamp(ratio, 1 - config.clip, 1 + config.clip)
    policy_loss = masked_mean(torch.max(-advantages * ratio, -advantages * clipped), mask)
    clip_fraction = masked_mean(((ratio - 1).abs() > config.clip).float(), mask)
    return policy_loss, clip_fraction


def value_objective(values, old_values, returns, mask, config):
    """L_value of one mini-batch, as the docstring writes it."""
    import torch

    values_clipped = old_values + torch.clamp(
        values - old_values, -config.value_clip, config.value_clip
    )
    return 0.5 * masked_mean(
        torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask
    )


def ppo_step(model, critic, optimizer, scheduler, judge, kind, tokenizer, prompts, config):
    """One PPO step: sample, score, estimate advantages, optimise. Returns the step's metrics."""
    import torch

    from lorabay.train.model import reference_policy

    started = time.perf_counter()
    rollouts = generate_rollouts(
        model, tokenizer, prompts, config.temperature, config.max_new_tokens, config.max_length
    )
    generated = time.perf_counter()
    mask = rollouts.response_mask
    with torch.no_grad():
        old_logprobs, entropy, old_values = policy_forward(
            model, critic, rollouts, config.temperature
        )
        with reference_policy(model):
            ref_logprobs, _, _ = policy_forward(model, None, rollouts, config.temperature)
        kl = (old_logprobs - ref_logprobs) * mask  # (B, T) per-token estimate of the KL
        rewards, judged = judge_rewards(judge, kind, tokenizer, rollouts)
        rewards = rewards - config.kl_coef * kl
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)
    scored = time.perf_counter()

    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
    updates = 0
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(prompts))
        for rows in order.chunk(config.mini_batches):
            part = rollouts.select(rows)
            optimizer.zero_grad()
            own_pass = critic.own_pass
            logprobs, _, values = policy_forward(
                model, None if own_pass else critic, part, config.temperature
            )
            policy_loss, clip_fraction = policy_objective(
                logprobs, old_logprobs[rows], advantages[rows], mask[rows], config
            )
            if own_pass:  # the policy's graph goes before the value model's pass is built
                policy_loss.backward()
                values = critic.values(model, part, None)
            value_loss = value_objective(
                values, old_values[rows], returns[rows], mask[rows], config
            )
            (config.vf_coef * value_loss + (0 if own_pass else policy_loss)).backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            totals["policy_loss"] += policy_loss.item()
            totals["value_loss"] += value_loss.item()
            totals["clip_fraction"] += clip_fraction.item()
            updates += 1
    metrics = {key: value / updates for key, value in totals.items()}
    metrics["loss"] = metrics["policy_loss"] + config.vf_coef * metrics["value_loss"]
    return {
        **judged,
        "kl": float(kl.sum(1).mean()),
        "entropy": float(masked_mean(entropy, mask)),
        **metrics,
        "response_length": float(mask.sum(1).mean()),
        "learning_rate": scheduler.get_last_lr()[0],
        # Where a step's time goes: sampling; the policy, reference and judge passes; PPO.
        "time_generate": generated - started,
        "time_score": scored - generated,
        "time_update": time.perf_counter() - scored,
    }


def prompt_batches(prompts: list, batch_size: int, steps: int, seed: int):
    """``steps`` batches of prompts, each pass over them in a new random order."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            batch.append(prompts[order.pop()])
        yield batch


# ---------------------------------------------------------------- the run


def train_rlhf(config: RLHFConfig, show_progress: bool = True) -> RunResult:
    """Train ``config`` (already validated by build_config) and return the finished run."""
    import torch
    from safetensors.torch import save_file
    from transformers import TrainerState, get_scheduler

    from lorabay.train.data import detect_shape, load_records
    from lorabay.train.heads import attach_head, check_head
    from lorabay.train.model import TRAINED_ADAPTER, add_reference_adapter, attach_adapter
    from lorabay.train.progress import RunProgress
    from lorabay.train.run import begin_run, load_policy, resolve_adapter, save_run

    records = load_records(config.data)
    detect_shape(records, "prompts", config.data)
    prompts = [record["prompt"] for record in records]
    kind, judge_ref = reward_source(config.reward)
    judge_source = resolve_adapter(judge_ref, config.registry)
    check_head(judge_source, kind, "--reward")  # before the run folder exists
    run = begin_run(config)
    output, parent = run.output, run.parent

    torch.manual_seed(config.seed)
    model, tokenizer, lora_config = load_policy(config, parent)
    if lora_config is not None:
        model = attach_adapter(model, lora_config)  # reference: the base, adapters disabled
    else:
        add_reference_adapter(model)  # reference: the starting adapter, frozen
    model, judge = attach_head(model, judge_source, JUDGE_ADAPTER, kind=kind, flag="--reward")
    model.set_adapter(TRAINED_ADAPTER)
    critic = Critic(model, config.value_model)
    # No dropout anywhere: the first pass over a batch must see ratio = 1 exactly.
    model.eval()

    steps = config.max_steps or math.ceil(config.epochs * len(prompts) / config.batch_size)
    updates = steps * config.ppo_epochs * config.mini_batches
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": trainable}, {"params": critic.parameters()}],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    scheduler = get_scheduler(
        config.scheduler, optimizer, round(config.warmup_ratio * updates), updates
    )
    state = TrainerState(max_steps=steps, logging_steps=config.logging_steps)
    progress = RunProgress(
        output / "metrics.jsonl", show_bar=show_progress, bar_keys=("reward", "kl")
    )
    progress.on_train_begin(None, state, None)
    started = time.perf_counter()
    for step, batch in enumerate(prompt_batches(prompts, config.batch_size, steps, config.seed)):
        logs = ppo_step(model, critic, optimizer, scheduler, judge, kind, tokenizer, batch, config)
        state.global_step = step + 1
        state.epoch = state.global_step * config.batch_size / len(prompts)
        if state.global_step % config.logging_steps == 0 or state.global_step == steps:
            state.log_history.append({**logs, "step": state.global_step})
            progress.on_log(None, state, None, logs=logs)
        progress.on_step_end(None, state, None)
    # As the transformers Trainer closes a run: the loop's wall time (setup excluded).
    progress.on_log(None, state, None, logs={"train_runtime": time.perf_counter() - started})
    progress.on_train_end(None, state, None)

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in critic.head.state_dict().items()},
        str(output / "value_head.safetensors"),
    )
    judge_record = {
        "reward": config.reward,
        "reward_kind": kind,
        "reward_digest": judge_source.digest,
    }
    result = save_run(config, run, model, state, progress, extra_hyperparameters=judge_record)
    result.extra["reference"] = (
        "frozen adapter 'ref' (the starting policy)"
        if parent is not None
        else "base with the adapter disabled"
    )
    return result
