"""The OpenAI-compatible endpoint `lorabay label` talks to: a lorabay gateway or any server
that speaks ``/v1/chat/completions`` (vLLM, llama.cpp's server, a hosted API).

httpx rather than the ``openai`` package: httpx is pinned in lorabay's ``serve`` (and
``gpu``) extra, which `lorabay label` needs anyway to start a gateway, while ``openai``
comes only with the ``dev`` extra; and the answers are read as plain JSON (log-probs,
the ``/v1/models`` cards lorabay adds digests to) with no typed models in between.

At most ``concurrency`` requests are in flight at once. 429, 5xx and lost connections
are tried again with backoff (an engine restarting answers 503 for a while); any other
refusal is an :class:`EndpointError` that says what to fix.

    async with Endpoint("http://127.0.0.1:8000", concurrency=8) as endpoint:
        pinned = await endpoint.pin("team/judge:prod")   # team/judge@sha256:..., team/judge:3
        answer = await endpoint.chat(pinned.served, messages, max_tokens=1, logprobs=True)
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit, urlunsplit

from lorabay.hub.errors import ConfigError, LorabayError

RETRY_STATUSES = (429, 500, 502, 503, 504)
ATTEMPTS = 5  # backoff 0.5, 1, 2, 4 s between them: an engine restart fits
PING = [{"role": "user", "content": "Hi"}]


class EndpointError(LorabayError):
    """The endpoint refused or could not answer; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0):
        self.status = status
        super().__init__(message, hint)


class RequestRefused(EndpointError):
    """A 400/413/422 for one request (a prompt beyond the context, say): that prompt fails,
    the run goes on."""


@dataclass(frozen=True)
class PinnedModel:
    """A model as asked for and as the endpoint served it.

    ``served`` is what every request of the run names: on a lorabay gateway the exact
    content (``name@sha256:...``), so moving an alias mid-run cannot mix two versions.
    """

    requested: str
    served: str
    ref: str | None = None  # name:version, when the endpoint's /v1/models says
    digest: str | None = None
    kind: str | None = None  # "base" for a gateway's base, else the adapter's kind

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def api_base(url: str) -> str:
    """``http://host:port`` or ``.../v1`` -> the ``.../v1`` root every route hangs from."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"--endpoint {url!r} is not an http(s) URL", "e.g. --endpoint http://127.0.0.1:8000"
        )
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def display_url(url: str) -> str:
    """The URL without user:password, to print and to record in provenance."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def read_api_key(variable: str) -> str | None:
    """The API key from the environment variable ``variable`` (never a flag: flags show in
    ``ps`` and shell history)."""
    return os.environ.get(variable) or None


def import_httpx():
    try:
        import httpx
    except ImportError:
        raise ConfigError(
            "lorabay label needs httpx, which comes with lorabay's serve extra",
            "pip install 'lorabay[serve,train]'",
        ) from None
    return httpx


class Endpoint:
    def __init__(
        self, url: str, api_key: str | None = None, concurrency: int = 8, timeout: float = 300
    ):
        httpx = import_httpx()
        self.url = api_base(url)
        self.shown = display_url(self.url)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.slots = asyncio.Semaphore(concurrency)
        self.requests = 0  # requests answered, retries not counted

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    async def models(self) -> list[dict]:
        """The cards of ``GET /v1/models``; empty when the endpoint cannot say (no such
        route, or a gateway whose registry is not there yet answers 503): the cards only
        add names and digests to the provenance, asked once, not retried."""
        try:
            body = await self._request("GET", "/models", attempts=1)
        except EndpointError:
            return []
        cards = body.get("data") if isinstance(body, dict) else None
        return [c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else []

    async def chat(self, model: str, messages: list[dict], **params) -> dict:
        """One ``POST /v1/chat/completions``; the answer's JSON."""
        body = {"model": model, "messages": messages, **params}
        answer = await self._request("POST", "/chat/completions", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise EndpointError(
                f"{self.shown}: the chat answer for {model!r} has no choices",
                "is --endpoint an OpenAI-compatible server?",
            )
        return answer

    async def pin(self, requested: str) -> PinnedModel:
        """Ask ``requested`` once and keep what the endpoint says it served (see PinnedModel)."""
        answer = await self.chat(requested, PING, max_tokens=1, temperature=0)
        served = answer.get("model") if isinstance(answer.get("model"), str) else requested
        card = _card_for(await self.models(), served)
        if card is None and served != requested:
            try:  # a server may name what it served in a way it does not accept back
                await self.chat(served, PING, max_tokens=1, temperature=0)
            except EndpointError:
                served = requested
        if card is None:
            return PinnedModel(requested, served)
        ref = card.get("id") if card.get("kind") != "base" else None
        return PinnedModel(requested, served, ref, card.get("digest"), card.get("kind"))

    async def _request(
        self, method: str, path: str, body: dict | None = None, attempts: int = ATTEMPTS
    ):
        httpx = import_httpx()
        async with self.slots:
            for attempt in range(attempts):
                last = attempt == attempts - 1
                try:
                    response = await self.client.request(method, path, json=body)
                except httpx.TransportError as error:
                    if last:
                        raise EndpointError(
                            f"cannot reach {self.shown} ({type(error).__name__})",
                            "check --endpoint, or leave it out to start a gateway with --base",
                        ) from None
                else:
                    if response.status_code < 400:
                        self.requests += 1
                        try:
                            return response.json()
                        except ValueError:
                            raise EndpointError(
                                f"{self.shown}{path} answered something that is not JSON",
                                "is --endpoint an OpenAI-compatible server?",
                            ) from None
                    if response.status_code not in RETRY_STATUSES or last:
                        raise refusal(self.shown, path, body, response)
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


def refusal(shown: str, path: str, body: dict | None, response) -> EndpointError:
    """The endpoint's refusal as one error that says what to do."""
    status = response.status_code
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200].strip() or response.reason_phrase
    model = (body or {}).get("model")
    what = f"{shown}{path}" + (f" for {model!r}" if model else "")
    if status == 401:
        return EndpointError(
            f"{what}: the API key was refused ({message})",
            "put the key in the variable --api-key-env names (default OPENAI_API_KEY)",
            status,
        )
    if status in (403, 404):
        return EndpointError(
            f"{what}: {status} {message}",
            "check --policy/--judge (`lorabay hub list` shows a registry's adapters)",
            status,
        )
    if status in (400, 413, 422):
        return RequestRefused(f"{what}: {status} {message}", None, status)
    return EndpointError(f"{what}: {status} {message}", "try again later", status)


def _card_for(cards: list[dict], served: str) -> dict | None:
    """The /v1/models card of a served model: by id, or (lorabay) by name@digest."""
    for card in cards:
        if card.get("id") == served:
            return card
    if "@" in served:
        name, digest = served.split("@", 1)
        for card in cards:
            if card.get("name") == name and card.get("digest") == digest:
                return card
    return None
