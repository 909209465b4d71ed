"""`lorabay label`, run: prompts in, labelled records out, with their provenance beside them.

    config = build_label_config({"prompts": "p.jsonl", "policy": "team/sft:1",
                                 "judge": "team/judge:1", "out": "labels.jsonl",
                                 "endpoint": "http://127.0.0.1:8000"})
    result = label(config)          # LabelResult: out, provenance, counts

A run is resumable: each finished prompt is appended to ``OUT.partial`` (a journal whose
first line holds the run's settings and the pinned models), and a stopped run given the
same options again continues with the prompts it had not finished. When every prompt is
done the records are written to ``OUT`` in prompt order (whole, by a rename), then
``OUT``'s provenance, then the journal is removed. At most ``--concurrency`` requests are
in flight; the same seed gives the same principles drawn (and, with ``--seeded-sampling``,
the same sampling seeds), resumed or not.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from lorabay.hub.errors import ConfigError
from lorabay.train.config import config_fields, convert_value, field_problems, option
from lorabay.train.label.constitution import ConstitutionError, load_constitution

MODE_SAMPLES = {"prefs": 2, "revise": 1}  # --samples 0 means these


class LabelProblems(ConfigError):
    """Every problem with a label run's options, one line each."""

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return super().__str__()
        lines = [f"lorabay label: {len(self.problems)} problems ({self.hint})"]
        return "\n".join(lines + [f"  {p}" for p in self.problems])


@dataclass
class LabelConfig:
    """One labelling run; the flags of `lorabay label` are these fields."""

    prompts: str | None = option(
        None, 'Prompts: .jsonl or .parquet records with a "prompt" (text or messages).',
        required=True,
    )  # fmt: skip
    policy: str | None = option(
        None,
        "The model that answers the prompts: a registry reference or the base's served "
        "name on a lorabay gateway, or any model id the --endpoint serves.",
        required=True,
    )
    judge: str | None = option(
        None,
        "The model that compares (prefs) or critiques and revises (revise): like --policy, "
        "and may be a stronger model than the policy.",
        required=True,
    )
    out: str | None = option(
        None,
        "Output .jsonl (DPO pairs or SFT records); NAME.provenance.json goes beside it.",
        required=True,
    )
    constitution: str | None = option(
        None, "YAML file of principles. Default: lorabay's example (train/assets)."
    )
    mode: str = option(
        "prefs",
        "prefs: judge pairs of responses (DPO data); revise: critique and revise (SFT data).",
        choices=("prefs", "revise"),
    )
    endpoint: str | None = option(
        None, "OpenAI-compatible server. Default: start `lorabay serve --base` for the run."
    )
    api_key_env: str = option(
        "OPENAI_API_KEY", "Environment variable holding the --endpoint's API key, if it needs one."
    )
    base: str | None = option(None, "Base the started gateway serves (without --endpoint).")
    registry: str | None = option(None, "Registry the started gateway serves adapters from.")
    quantization: str = option(
        "none", "Quantization of the started gateway's base.", choices=("none", "nf4")
    )
    serve_args: str = option(
        "", "More `lorabay serve` flags for the started gateway, e.g. '--dtype float32'."
    )
    samples: int = option(
        0, "Responses per prompt (0: 2 for prefs, every pair compared; 1 for revise).", minimum=0
    )
    temperature: float = option(1.0, "Sampling temperature of the policy.", minimum=0)
    top_p: float = option(1.0, "Nucleus sampling of the policy.", above=0, maximum=1)
    max_tokens: int = option(256, "Longest response of the policy, in tokens.", minimum=1)
    judge_max_tokens: int = option(
        256, "Longest critique or revision of the judge (revise).", minimum=1
    )
    judge_temperature: float = option(
        0.0, "Sampling temperature of critiques and revisions (revise).", minimum=0
    )
    threshold: float = option(
        0.6,
        "Keep a pair only when the judge prefers one response with at least this probability.",
        minimum=0.5,
        maximum=1,
    )
    principles: list[str] = option(
        [], "Draw only these principles (comma-separated names). Default: all, by weight."
    )
    concurrency: int = option(8, "Requests in flight at once.", minimum=1, maximum=1024)
    seed: int = option(0, "Seed of the principles drawn (and of --seeded-sampling).", minimum=0)
    seeded_sampling: bool = option(
        False,
        "Send each sampling request a seed drawn from --seed (reproducible responses where the "
        "server honours it). Off by default: vLLM 0.32's CPU engine dies on a seeded request "
        "whose prompt it prefills in chunks.",
    )
    timeout: float = option(300.0, "Seconds one request may take.", above=0)
    overwrite: bool = option(
        False, "Start over: drop an earlier --out, its journal and provenance."
    )

    def check(self, given: set[str]) -> list[str]:
        problems = []
        if self.endpoint is None and not self.base:
            problems.append(
                "--base is needed without --endpoint: the base of the gateway `lorabay label` "
                "starts (or give --endpoint URL of a running server)"
            )
        if self.endpoint is not None:
            started_only = sorted({"base", "registry", "quantization", "serve_args"} & given)
            for key in started_only:
                problems.append(
                    f"--{key.replace('_', '-')} is for the gateway `lorabay label` starts: "
                    "drop it with --endpoint (that server has its own)"
                )
        if self.prompts:
            path = Path(self.prompts)
            if not path.is_file():
                problems.append(f"--prompts {self.prompts}: no such file")
            elif path.suffix not in (".jsonl", ".json", ".parquet"):
                problems.append(f"--prompts {self.prompts}: use a .jsonl or .parquet file")
        if self.out:
            out = Path(self.out)
            if out.suffix != ".jsonl":
                problems.append(f"--out {self.out}: write a .jsonl file, e.g. labels.jsonl")
            elif self.prompts and out.resolve() == Path(self.prompts).resolve():
                problems.append("--out is the --prompts file: write the labels elsewhere")
            elif out.exists() and not self.overwrite and not journal_path(out).exists():
                problems.append(
                    f"--out {self.out} exists: pass --overwrite to label again, or pick "
                    "another file"
                )
        if self.mode == "prefs" and 0 < self.samples < 2:
            problems.append("--samples: prefs compares pairs, so it needs at least 2")
        return problems

    @property
    def responses(self) -> int:
        return self.samples or MODE_SAMPLES[self.mode]


def build_label_config(flags: dict[str, typing.Any]) -> LabelConfig:
    """The run ``flags`` describe (keys with dashes or underscores; None: not given); raises
    :class:`LabelProblems` with every problem, the constitution's included."""
    specs = {spec.key: spec for spec in config_fields(LabelConfig)}
    problems: list[str] = []
    values, given = {}, set()
    for raw_key, value in flags.items():
        key = raw_key.replace("-", "_")
        if key not in specs:
            problems.append(f"unknown option {raw_key!r}")
            continue
        if value is None:
            continue
        given.add(key)
        try:
            values[specs[key].name] = convert_value(specs[key], value)
        except ValueError as error:
            problems.append(f"{specs[key].flag} {error}")
    config = LabelConfig(**values)
    problems += field_problems(config)
    problems += config.check(given)
    try:
        constitution = load_constitution(config.constitution)
    except ConstitutionError as error:
        problems += [f"--constitution {error.path} {p}" for p in error.problems]
    except ConfigError as error:
        problems += error.problems
    else:
        names = {p.name for p in constitution.principles}
        for name in config.principles:
            if name not in names:
                problems.append(
                    f"--principles {name!r} is not in the constitution "
                    f"(it has {', '.join(sorted(names))})"
                )
    if problems:
        raise LabelProblems(problems, "fix the options above; `lorabay label --help` lists them")
    return config


# ---------------------------------------------------------------- the journal


def journal_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


@dataclass
class Journal:
    """``OUT.partial``: the settings line, then one line per finished prompt."""

    path: Path
    header: dict
    done: dict[int, dict] = field(default_factory=dict)
    sessions: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, settings: dict) -> Journal:
        """The journal of an earlier run with these ``settings``, or a new (empty) one."""
        if not path.exists():
            return cls(path, {"settings": settings})
        lines = path.read_text(encoding="utf-8").split("\n")
        complete, tail = lines[:-1], lines[-1]  # a line cut by a kill has no newline
        if tail:
            with path.open("r+b") as f:  # drop it: that prompt is labelled again
                f.truncate(len("\n".join(complete).encode()) + (1 if complete else 0))
        try:
            entries = [json.loads(line) for line in complete if line.strip()]
        except ValueError:
            raise ConfigError(
                f"{path} is damaged (not one JSON object per line)",
                "pass --overwrite to start the run over",
            ) from None
        if not entries or "settings" not in entries[0]:
            return cls(path, {"settings": settings})
        header = entries[0]
        if header["settings"] != settings:
            changed = sorted(
                k for k in settings.keys() | header["settings"].keys()
                if settings.get(k) != header["settings"].get(k)
            )  # fmt: skip
            raise ConfigError(
                f"{path} holds a run started with other settings ({', '.join(changed)})",
                "give the same options to continue it, or --overwrite to start over",
            )
        journal = cls(path, header)
        for entry in entries[1:]:
            if "index" in entry:
                journal.done[entry["index"]] = entry
            elif "session" in entry:
                journal.sessions.append(entry["session"])
        return journal

    def write(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            if f.tell() == 0:
                f.write(json.dumps(self.header) + "\n")
            f.write(json.dumps(entry) + "\n")
        if "session" in entry:
            self.sessions.append(entry["session"])
        elif "index" in entry:
            self.done[entry["index"]] = entry


# ---------------------------------------------------------------- the run


@dataclass
class LabelResult:
    out: Path
    provenance_file: Path
    provenance: dict
    resumed: int  # prompts an earlier, stopped run had finished

    @property
    def counts(self) -> dict:
        return self.provenance["counts"]

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "provenance_file": str(self.provenance_file),
            "resumed": self.resumed,
            **self.provenance,
        }


def label(config: LabelConfig, show_progress: bool = True, notify=None) -> LabelResult:
    """Run ``config`` (built by :func:`build_label_config`): start a gateway if there is no
    ``--endpoint``, label every prompt not yet done, write OUT and its provenance."""
    from lorabay.train.data import dataset_digest

    prompts = read_prompts(config.prompts)
    constitution = load_constitution(config.constitution)
    out = Path(config.out)
    journal_file = journal_path(out)
    if config.overwrite:
        for path in (out, journal_file, provenance_file_for(out)):
            path.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = run_settings(config, dataset_digest(config.prompts), constitution.digest)
    journal = Journal.open(journal_file, settings)  # refuses other settings before any start
    resumed = len(journal.done)

    if config.endpoint is not None:
        asyncio.run(
            label_prompts(config, prompts, constitution, journal, config.endpoint, show_progress)
        )
    else:
        from lorabay.train.label.gateway import started_gateway

        with started_gateway(
            config.base, config.registry, config.quantization, config.serve_args, notify=notify
        ) as gateway:
            asyncio.run(
                label_prompts(config, prompts, constitution, journal, gateway.url, show_progress)
            )
    return finish(config, prompts, constitution, journal, resumed)


def read_prompts(path: str) -> list:
    from lorabay.train.data import detect_shape, load_records

    try:
        records = load_records(path)
        detect_shape(records, "prompts", path)
    except ConfigError as error:  # data.py names the training flag, --data
        raise ConfigError(
            [p.replace("--data ", "--prompts ", 1) for p in error.problems], error.hint
        ) from None
    return [record["prompt"] for record in records]


def run_settings(config: LabelConfig, prompts_digest: str, constitution_digest: str) -> dict:
    """What the records depend on: a journal continues only a run with the same settings."""
    return {
        "mode": config.mode,
        "prompts": prompts_digest,
        "policy": config.policy,
        "judge": config.judge,
        "constitution": constitution_digest,
        "samples": config.responses,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_tokens,
        "judge_max_tokens": config.judge_max_tokens,
        "judge_temperature": config.judge_temperature,
        "threshold": config.threshold,
        "principles": sorted(config.principles),
        "seed": config.seed,
        "seeded_sampling": config.seeded_sampling,
    }


async def label_prompts(config, prompts, constitution, journal: Journal, url, show_progress):
    from lorabay.train.label.client import Endpoint, PinnedModel, RequestRefused, read_api_key
    from lorabay.train.label.modes import MODES, Job

    endpoint = Endpoint(url, read_api_key(config.api_key_env), config.concurrency, config.timeout)
    async with endpoint:
        pins = journal.header.get("pins")
        if pins is None:  # a new run: pin what the endpoint serves now
            policy, judge = await asyncio.gather(
                endpoint.pin(config.policy), endpoint.pin(config.judge)
            )
            journal.header["pins"] = {"policy": policy.to_dict(), "judge": judge.to_dict()}
        else:  # a resumed run keeps the versions it started with
            policy, judge = PinnedModel(**pins["policy"]), PinnedModel(**pins["judge"])
            await asyncio.gather(endpoint.pin(policy.served), endpoint.pin(judge.served))
        journal.write({"session": {"endpoint": endpoint.shown, "started": now()}})
        job = Job(
            endpoint=endpoint,
            policy=policy,
            judge=judge,
            constitution=constitution,
            samples=config.responses,
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_tokens,
            judge_max_tokens=config.judge_max_tokens,
            judge_temperature=config.judge_temperature,
            threshold=config.threshold,
            principles=tuple(config.principles),
            seed=config.seed,
            seeded_sampling=config.seeded_sampling,
        )
        run_mode = MODES[config.mode]
        todo = [i for i in range(len(prompts)) if i not in journal.done]
        bar = progress_bar(len(prompts), len(journal.done), config.mode, show_progress)
        totals = Counter()
        for entry in journal.done.values():
            totals.update(entry.get("counts", {}))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in todo:
            queue.put_nowait(index)

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                try:
                    outcome = await run_mode(job, index, prompts[index])
                    entry = {"index": index, "records": outcome.records, "counts": outcome.counts}
                except RequestRefused as error:  # this prompt only (beyond the context, ...)
                    entry = {"index": index, "records": [], "counts": {"failed": 1}}
                    entry["error"] = str(error)
                journal.write(entry)
                totals.update(entry["counts"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(bar_numbers(totals, config.mode), refresh=False)

        workers = [asyncio.create_task(worker()) for _ in range(min(config.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if bar is not None:
                bar.close()


def progress_bar(total: int, done: int, mode: str, show: bool):
    if not show:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=done, desc=f"label {mode}", unit="prompt", dynamic_ncols=True,
        file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 15,
    )  # fmt: skip


def bar_numbers(counts: Counter, mode: str) -> dict:
    dropped = dropped_total(counts)
    if mode == "prefs":
        return {"pairs kept": counts["records"], "dropped": dropped}
    return {"records": counts["records"], "dropped": dropped}


def dropped_total(counts) -> int:
    return sum(int(v) for k, v in counts.items() if k.startswith("dropped_"))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def provenance_file_for(out: Path) -> Path:
    from lorabay.train.label.provenance import provenance_path

    return provenance_path(out)


def finish(config, prompts, constitution, journal: Journal, resumed: int) -> LabelResult:
    """Write OUT (prompt order) and its provenance; remove the journal."""
    from lorabay.train.data import dataset_digest, write_jsonl
    from lorabay.train.label.provenance import KIND, SCHEMA, write_provenance

    out = Path(config.out)
    missing = [i for i in range(len(prompts)) if i not in journal.done]
    if missing:  # not reachable unless a worker died without raising
        raise ConfigError(f"{len(missing)} prompts were not labelled", "run the command again")
    entries = [journal.done[i] for i in range(len(prompts))]
    records = [record for entry in entries for record in entry["records"]]
    write_jsonl(records, out)
    counts = Counter()
    for entry in entries:
        counts.update(entry.get("counts", {}))
    provenance = {
        "kind": KIND,
        "schema": SCHEMA,
        "mode": config.mode,
        "output": {"file": out.name, "digest": dataset_digest(out), "records": len(records)},
        "prompts": {
            "file": str(config.prompts),
            "digest": journal.header["settings"]["prompts"],
            "count": len(prompts),
        },
        "policy": journal.header["pins"]["policy"],
        "judge": journal.header["pins"]["judge"],
        "constitution": constitution.to_provenance(),
        "principles": sorted(config.principles) or "all, by weight",
        "sampling": {
            key: journal.header["settings"][key]
            for key in ("samples", "temperature", "top_p", "max_tokens", "seed", "seeded_sampling")
        },
        "judging": judging_settings(config),
        "counts": summarise(counts, config.mode),
        "errors": [e["error"] for e in entries if "error" in e][:5],
        "endpoints": sorted({s["endpoint"] for s in journal.sessions}),
        "created_at": now(),
        "lorabay": version("lorabay"),
    }
    if config.endpoint is None:
        provenance["gateway"] = {"base": str(config.base), "quantization": config.quantization}
    provenance_file = write_provenance(provenance_file_for(out), provenance)
    journal.path.unlink(missing_ok=True)
    return LabelResult(out, provenance_file, provenance, resumed)


def judging_settings(config: LabelConfig) -> dict:
    from lorabay.train.label.judge import TOP_LOGPROBS

    if config.mode == "prefs":
        return {
            "orders": "both (A/B swapped), soft label = mean p(better)",
            "answer_tokens": ["A", "B"],
            "top_logprobs": TOP_LOGPROBS,
            "threshold": config.threshold,
        }
    return {"max_tokens": config.judge_max_tokens, "temperature": config.judge_temperature}


def summarise(counts: Counter, mode: str) -> dict:
    """The journal's summed counts as the provenance reports them (rates, not sums)."""
    summary = {key: int(value) for key, value in sorted(counts.items()) if not key.endswith("_sum")}
    summary.setdefault("records", 0)
    summary["dropped_total"] = dropped_total(counts)
    if mode == "prefs":
        verdicts = counts["judged"] - counts["dropped_no_verdict"]
        summary.pop("orders_agree", None)
        if verdicts:
            # 0.5: no position bias; 1.0: the judge always answers A.
            summary["first_position_rate"] = round(counts["first_position_sum"] / (2 * verdicts), 4)
            summary["answer_mass"] = round(counts["answer_mass_sum"] / (2 * verdicts), 4)
            summary["order_agreement"] = round(counts["orders_agree"] / verdicts, 4)
    return summary
