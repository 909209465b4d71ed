"""What `lorabay serve` was asked to do: one dataclass, validated in one place.

The click command in ``cli/serve.py`` is a spelling of :class:`ServeOptions`;
:func:`check_options` reports every problem at once, each naming the flag.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from lorabay.hub.base_config import local_base_config, lora_parameters
from lorabay.hub.errors import ConfigError
from lorabay.hub.machine import bf16_is_emulated, cpu_engine

# vLLM's CPU KV cache and scheduler cap; 64 concurrent requests must batch together.
DEFAULT_MAX_NUM_SEQS = 128
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# vLLM flags that would move the engine off its private socket or change its token.
GATEWAY_OWNED_ENGINE_FLAGS = ("--uds", "--host", "--port", "--api-key", "--root-path")
DEFAULT_MAX_N = 16  # choices per request; OpenAI allows 128, one n=100 request held a CPU 8 s
# Adapter counts when --max-loras / --max-loaded are not given, sized from the machine's
# memory and the largest adapter the engine accepts (every linear module at
# --max-lora-rank): the engine's batch slots may take SLOT_MEMORY_SHARE of it, the adapters
# it keeps loaded ADAPTER_MEMORY_SHARE. Past MAX_BATCH_LORAS distinct adapters in one batch
# the grouped CPU path gains nothing (bench/README.md, serving); past MAX_LOADED the
# gateway's bookkeeping, not memory, is the cost. A base whose config cannot size them (a
# Hugging Face id, a non-Llama layout) gets UNSIZED_LOADED.
SLOT_MEMORY_SHARE = 0.05
ADAPTER_MEMORY_SHARE = 0.10
MAX_BATCH_LORAS = 32
MAX_LOADED = 1024
UNSIZED_LOADED = 128


@dataclass(frozen=True)
class SearchLimits:
    """Bounds on test-time compute per request (serve/ttc.py): ``best_of`` candidates, a
    beam search's ``width`` x ``expand`` continuations per step, and its ``max_steps``."""

    max_best_of: int = 64  # the benchmark's largest N
    max_search_samples: int = 64  # width x expand
    max_search_steps: int = 32


@dataclass
class ServeOptions:
    base: str  # base model: a local folder or a Hugging Face model id
    served_name: str | None = None  # the name clients use for the base (default: last path part)
    quantization: str = "none"  # nf4 | awq | gptq | none
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    registry: str | None = None  # registry URL (None: $LORABAY_REGISTRY or the embedded one)
    host: str = "127.0.0.1"  # gateway address
    port: int = 8000  # gateway port (0: any free port)
    api_keys: str | None = None  # file mapping API keys to adapter name patterns
    insecure: bool = False  # allow a non-loopback bind without --api-keys
    max_loras: int | None = None  # adapters in one engine batch (None: sized, batch_loras)
    max_cpu_loras: int | None = None  # adapters the engine keeps in host memory
    max_lora_rank: int = 16  # highest adapter rank the engine accepts
    max_loaded: int | None = None  # adapters kept loaded, LRU past it (None: sized)
    max_model_len: int | None = None  # context length (None: the base's)
    json_logs: bool = False  # one JSON object per log line
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # sequences the engine batches at once
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # request bodies above this get 413
    max_n: int = DEFAULT_MAX_N  # choices (``n``) one request may ask for; more get 400
    max_best_of: int = SearchLimits.max_best_of  # candidates one best_of request may sample
    max_search_samples: int = SearchLimits.max_search_samples  # beam width x expand
    max_search_steps: int = SearchLimits.max_search_steps  # steps of one beam search
    metrics_host: str = "127.0.0.1"  # address of the metrics listener
    metrics_port: int | None = None  # its port (0: any free one; None: no metrics listener)
    engine_start_timeout: float = 900.0  # seconds to wait for the engine to be ready
    engine_args: tuple[str, ...] = field(default_factory=tuple)  # extra vLLM flags, verbatim
    peers: str | None = None  # the gateways serving this base: adapter affinity (peers.py)
    spill_at: int | None = None  # in flight here past which forwarded requests go back
    peer_secret_file: str | None = None  # the secret the --peers gateways sign forwards with
    trust: str | None = None  # trust policy: which keys may sign which names (hub/signing.py)

    @property
    def served_model_name(self) -> str:
        # The folder's name (also for "."), or a hub id's last part (--served-name's help).
        if self.served_name:
            return self.served_name
        folder = Path(self.base).expanduser()
        return folder.resolve().name if folder.is_dir() else self.base.rstrip("/").split("/")[-1]

    @property
    def search_limits(self) -> SearchLimits:
        return SearchLimits(self.max_best_of, self.max_search_samples, self.max_search_steps)

    @property
    def spill_limit(self) -> int:
        return self.max_num_seqs if self.spill_at is None else self.spill_at  # --spill-at's help

    @property
    def batch_loras(self) -> int:
        """--max-loras, or as many batch slots as SLOT_MEMORY_SHARE holds, at most
        MAX_BATCH_LORAS, --max-num-seqs and --max-cpu-loras."""
        if self.max_loras is not None:
            return self.max_loras
        most = min(MAX_BATCH_LORAS, self.max_num_seqs, self.max_cpu_loras or MAX_BATCH_LORAS)
        size = self.adapter_bytes
        if size is None:
            return most
        return max(1, min(most, int(self.memory * SLOT_MEMORY_SHARE // size)))

    @property
    def loaded_limit(self) -> int:
        """--max-loaded, or as many adapters as ADAPTER_MEMORY_SHARE holds (at least one
        batch's worth, at most MAX_LOADED)."""
        if self.max_loaded is not None:
            return self.max_loaded
        size = self.adapter_bytes
        fits = UNSIZED_LOADED if size is None else int(self.memory * ADAPTER_MEMORY_SHARE // size)
        return max(self.batch_loras, min(MAX_LOADED, fits))

    @cached_property
    def adapter_bytes(self) -> int | None:
        """Bytes of the largest adapter the engine accepts: rank --max-lora-rank on every
        linear module of the base, in the engine's dtype. None when the base's config is
        not a local Llama-style one."""
        found = local_base_config(self.base)
        if found is None:
            return None
        try:
            parameters = lora_parameters(found.text, int(self.max_lora_rank))
        except ConfigError:
            return None
        dtype = self.engine_dtype if self.engine_dtype != "auto" else found.dtype
        return parameters * (4 if dtype == "float32" else 2)

    def describe_adapter_sizes(self) -> str:
        """One line for the log: the adapter counts in force and where they came from."""

        def source(given: int | None, flag: str) -> str:
            return flag if given is not None else f"sized, {flag} to set"

        memory = f"{self.memory / 2**30:.0f} GiB memory"
        size = self.adapter_bytes
        each = (
            f"{size / 1e6:.1f} MB per rank-{self.max_lora_rank} adapter" if size else "size unknown"
        )
        return (
            f"{self.batch_loras} per batch ({source(self.max_loras, '--max-loras')}), "
            f"{self.loaded_limit} loaded ({source(self.max_loaded, '--max-loaded')}); "
            f"{memory}, {each}"
        )

    @cached_property
    def memory(self) -> int:
        return machine_memory()  # read once: every count above derives from it

    @property
    def cpu_loras(self) -> int:
        # vLLM keeps adapters beyond max_cpu_loras only by re-reading them from disk on use;
        # sizing its host cache to the gateway's own cap keeps every loaded adapter resident.
        return self.max_cpu_loras or max(self.batch_loras, self.loaded_limit)

    @property
    def engine_dtype(self) -> str:
        """``--dtype`` as given; auto: vLLM's (the base's own), except where it would be slow
        or fail (:meth:`describe_dtype` says why)."""
        if self.dtype != "auto":
            return self.dtype
        # bitsandbytes NF4 in vLLM packs two 4-bit values per byte only for 16-bit
        # activations (its quant ratio is bits(dtype)/8): float32 fails while loading.
        if self.quantization == "nf4":
            return "bfloat16"
        if self.bf16_base_on_emulating_cpu:
            return "float32"
        return "auto"

    @cached_property
    def bf16_base_on_emulating_cpu(self) -> bool:
        """A bfloat16 base the CPU engine would compute in emulated bfloat16 (hub/machine.py:
        5-11x slower than float32 on an AVX2-only CPU)."""
        found = local_base_config(self.base)
        return (
            found is not None and found.dtype == "bfloat16" and cpu_engine() and bf16_is_emulated()
        )

    def describe_dtype(self) -> str:
        """One line for the log: the engine's dtype and why."""
        dtype = self.engine_dtype
        if self.dtype != "auto":
            return f"{dtype} (--dtype)"
        if self.quantization == "nf4":
            return f"{dtype} (NF4 needs 16-bit activations)"
        if dtype == "float32":
            return (
                "float32 (auto: this CPU has no bfloat16 arithmetic, so the bfloat16 base "
                "computes in float32; --dtype bfloat16 to force)"
            )
        return "auto (the base's own)"


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit when
    lower (a Kubernetes pod sees the node's total in /proc/meminfo)."""
    import psutil

    total = psutil.virtual_memory().total
    for path in CGROUP_LIMITS:
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def check_options(options: ServeOptions) -> None:
    """Raise one :class:`ConfigError` listing every problem with ``options``."""
    problems: list[str] = []
    base = Path(options.base).expanduser()
    looks_local = options.base.startswith((".", "/", "~")) or base.exists()
    if looks_local and not (base / "config.json").is_file():
        problems.append(f"--base {options.base}: no config.json there (a model folder is needed)")
    if options.quantization == "nf4" and options.dtype == "float32":
        problems.append(
            "--quantization nf4 needs 16-bit activations: use --dtype bfloat16 (or auto)"
        )
    if not is_loopback(options.host) and not options.api_keys and not options.insecure:
        problems.append(
            f"--host {options.host} is not loopback: pass --api-keys FILE "
            "(or --insecure to serve without keys)"
        )
    if options.max_cpu_loras is not None and options.max_cpu_loras < options.batch_loras:
        problems.append(
            f"--max-cpu-loras {options.max_cpu_loras} is below --max-loras {options.batch_loras}"
        )
    if options.max_body_bytes < 1024:
        problems.append("--max-body-bytes must be at least 1024")
    owned = [a for a in options.engine_args if a.split("=", 1)[0] in GATEWAY_OWNED_ENGINE_FLAGS]
    if owned:
        problems.append(
            f"--engine-arg {owned[0]}: the gateway sets the engine's address and token itself "
            "(a private Unix socket and a random token); drop it"
        )
    if options.max_n < 1:
        problems.append("--max-n must be at least 1")
    for flag, value in (
        ("--max-best-of", options.max_best_of),
        ("--max-search-samples", options.max_search_samples),
        ("--max-search-steps", options.max_search_steps),
    ):
        if value < 1:
            problems.append(f"{flag} must be at least 1")
    if options.trust is not None:
        from lorabay.hub.signing import TrustPolicy

        try:
            TrustPolicy.load(options.trust)
        except ConfigError as error:
            problems += [f"--trust: {problem}" for problem in error.problems]
    if options.metrics_port is not None and options.metrics_port == options.port != 0:
        problems.append(f"--metrics-port {options.metrics_port} is the API's --port too")
    if options.peers is not None:
        from lorabay.serve.peers import parse_peers

        try:
            parse_peers(options.peers)
        except ConfigError as error:
            problems += [f"{problem}: {error.hint}" for problem in error.problems]
        if not options.peer_secret_file:
            problems.append(
                "--peers needs --peer-secret-file: the gateways sign the requests they forward "
                "with it (`openssl rand -hex 32 > FILE`, the same file for every gateway)"
            )
    else:
        if options.spill_at is not None:
            problems.append("--spill-at applies to requests other gateways forward: add --peers")
        if options.peer_secret_file:
            problems.append("--peer-secret-file signs requests forwarded to --peers: add --peers")
    if problems:
        raise ConfigError(problems, "see `lorabay serve --help`")
