"""`lorabay serve`: the vLLM engine (supervised child) behind the OpenAI-compatible gateway.

The Helm chart builds its container command from these options (tests/deploy reads
them from this click command), so an option added here is an option the chart knows.
"""

from __future__ import annotations

import click

from lorabay.cli.base import resolve_base_option
from lorabay.serve.options import ServeOptions

# Every default is ServeOptions' own: the dataclass is the one place they are written.
DEFAULTS = ServeOptions(base="")


@click.command()
@click.option(
    "--base",
    required=True,
    callback=resolve_base_option(allow_hub_id=True),
    help="Base model: a folder, a pulled base's name (lorabay base pull) or a Hugging Face id.",
)
@click.option(
    "--served-name",
    default=None,
    help="Name clients use for the base itself (default: the folder or id's last part).",
)
@click.option(
    "--quantization",
    type=click.Choice(["nf4", "awq", "gptq", "none"]),
    default=DEFAULTS.quantization,
    show_default=True,
    help="nf4: bitsandbytes 4-bit, quantized while loading; awq/gptq: a pre-quantized base.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default=DEFAULTS.dtype,
    show_default=True,
    help="Activations: auto is the base's own dtype, but float32 for a bfloat16 base on a CPU "
    "without bfloat16 arithmetic (AVX2-only: emulated, 5-11x slower); nf4 needs 16 bits.",
)
@click.option(
    "--registry",
    default=None,
    help="Registry URL (file://DIR, s3://BUCKET/PREFIX or oci://HOST[:PORT]/REPOSITORY). Default: $LORABAY_REGISTRY or the embedded one.",
)
@click.option(
    "--host",
    default=DEFAULTS.host,
    show_default=True,
    help="Gateway address. Anything but loopback needs --api-keys or --insecure.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULTS.port,
    show_default=True,
    help="Gateway port (0: any free port).",
)
@click.option(
    "--api-keys",
    "api_keys",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="YAML/JSON file mapping API keys to the adapter name patterns each may use.",
)
@click.option(
    "--insecure", is_flag=True, help="Allow binding a non-loopback address without --api-keys."
)
@click.option(
    "--max-loras",
    type=click.IntRange(1),
    default=None,
    help="Distinct adapters in one engine batch; requests for more wait for a slot "
    "(default: what 5% of the machine's memory holds at --max-lora-rank, at most 32).",
)
@click.option(
    "--max-cpu-loras",
    type=click.IntRange(1),
    default=None,
    help="Adapters the engine keeps in host memory (default: max(--max-loras, --max-loaded)).",
)
@click.option(
    "--max-lora-rank",
    type=click.Choice(["8", "16", "32", "64", "128", "256"]),
    default=str(DEFAULTS.max_lora_rank),
    show_default=True,
    help="Highest adapter rank the engine accepts.",
)
@click.option(
    "--max-loaded",
    type=click.IntRange(1),
    default=None,
    help="Adapters loaded in the engine at once; the least recently used is unloaded past it "
    "(default: what 10% of the machine's memory holds at --max-lora-rank, at most 1024).",
)
@click.option(
    "--max-model-len",
    type=click.IntRange(16),
    default=None,
    help="Context length (default: the base's).",
)
@click.option(
    "--max-num-seqs",
    type=click.IntRange(1),
    default=DEFAULTS.max_num_seqs,
    show_default=True,
    help="Sequences the engine batches at once.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(1024),
    default=DEFAULTS.max_body_bytes,
    show_default=True,
    help="Request bodies larger than this get 413.",
)
@click.option(
    "--max-n",
    type=click.IntRange(1),
    default=DEFAULTS.max_n,
    show_default=True,
    help="Choices (`n`) one request may ask for; more get 400 saying so.",
)
@click.option(
    "--max-best-of",
    type=click.IntRange(1),
    default=DEFAULTS.max_best_of,
    show_default=True,
    help="Candidates one request's `best_of` may sample (best-of-N with a verifier); more get 400.",
)
@click.option(
    "--max-search-samples",
    type=click.IntRange(1),
    default=DEFAULTS.max_search_samples,
    show_default=True,
    help="Continuations per step of a beam `search` (width x expand); more get 400.",
)
@click.option(
    "--max-search-steps",
    type=click.IntRange(1),
    default=DEFAULTS.max_search_steps,
    show_default=True,
    help="Steps one beam `search` may take (`max_steps`); more get 400.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics on this port (0: any free one), for the scraper only: "
    "the API port never serves them (they name every tenant's adapters). Default: none.",
)
@click.option(
    "--metrics-host",
    default=DEFAULTS.metrics_host,
    show_default=True,
    help="Address of the --metrics-port listener.",
)
@click.option(
    "--engine-start-timeout",
    type=click.FloatRange(1),
    default=DEFAULTS.engine_start_timeout,
    show_default=True,
    help="Seconds to wait for the engine to be ready.",
)
@click.option(
    "--engine-arg",
    "engine_args",
    multiple=True,
    help="An extra vLLM server flag, verbatim (repeatable), e.g. --engine-arg=--seed=1.",
)
@click.option(
    "--peers",
    default=None,
    help="The gateways serving this base (this one included), for adapter affinity: "
    "http://HOST:PORT,... or dns:NAME:PORT (a headless Service). Each adapter name gets one "
    "home among them; requests arriving elsewhere are forwarded there.",
)
@click.option(
    "--spill-at",
    type=click.IntRange(min=0),
    default=None,
    help="With --peers: when this many requests are in flight here, requests other gateways "
    "forward are sent back and answered where they arrived (a hot adapter spreads over the "
    "gateways). Default: --max-num-seqs.",
)
@click.option(
    "--peer-secret-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="With --peers (required there): a file holding the secret every gateway of the group "
    "shares; forwarded requests carry its HMAC, so a client cannot pose as a peer.",
)
@click.option(
    "--trust",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Trust policy (YAML): which public keys may sign which adapter names, e.g. "
    "{keys: {release: release.pub}, rules: [{names: ['team-a/*'], signers: [release]}]}. "
    "An adapter without a valid signature (`lorabay hub push --sign`) by a signer its rule "
    "allows is refused (403, with the reason), checked on its verified files before the "
    "engine loads it.",
)
@click.option("--json-logs", is_flag=True, help="Log one JSON object per line.")
def serve(**options) -> None:
    """Serve one base and the registry's adapters on an OpenAI-compatible endpoint.

    \b
    SIGINT/SIGTERM stop the gateway and the engine. Without --api-keys only a
    loopback --host is allowed (unless --insecure), and then only requests to a
    loopback Host with JSON bodies are answered. The engine listens on a Unix
    socket only the gateway can open.

    \b
    Example:
      lorabay serve --base ./tiny --quantization nf4 --port 8000 --metrics-port 9400
      curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "team/summarize:prod", "messages": [{"role": "user", "content": "hi"}]}'
    """
    from lorabay.serve.server import run_server

    options["max_lora_rank"] = int(options["max_lora_rank"])
    options["engine_args"] = tuple(options["engine_args"])
    run_server(ServeOptions(**options))
