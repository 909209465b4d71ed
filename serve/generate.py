"""One generation request, top to bottom: what the gateway does between the client and
the engine (``/v1/chat/completions`` and ``/v1/completions``; ``/v1/verify`` at the end).

1. :func:`generate`: authenticate the key, read the body (bounded in size and time), check
   it (serve/validate.py) and its best_of/search plan (serve/ttc.py); from then on it is
   in flight, and a client that hangs up cancels it.
2. :func:`answer`: a request another gateway should answer goes there (``--peers``); one
   with a plan goes to serve/ttc.py; otherwise the adapter is resolved and leased
   (loaded into the engine if it is not: the pool), the body re-aimed at the engine's
   name for it, with the key's prefix-cache salt, and sent.
3. The engine's answer: whole (:func:`finish_plain`: its errors mapped to the gateway's,
   a dead engine to 503) or streamed (:class:`StreamRelay`: its SSE events passed on as
   bytes, the lease and the in-flight slot let go exactly once however the stream ends).
4. :class:`RequestTimer` records latency, TTFT and tokens once, at the end.

Streams are passed through as the engine's bytes, whole SSE events at a time; only events
that carry usage are parsed (the gateway asks for the final one, for its token metrics,
and drops it again when the client did not ask). Nothing is re-encoded per token.

The gateway's state and its conversations with the engine and the peers are
serve/gateway.py; the answers' shapes serve/responses.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lorabay.hub.errors import LorabayError
from lorabay.serve.engine import engine_answer
from lorabay.serve.gateway import ClientGone, Gateway, StreamedAnswer, engine_down
from lorabay.serve.metrics import GatewayMetrics
from lorabay.serve.peers import BUSY
from lorabay.serve.responses import (
    CLIENT_CLOSED,
    AsciiJSONResponse,
    error_response,
    lorabay_error_response,
)
from lorabay.serve.ttc import answer_ttc, read_plan, read_verify_request
from lorabay.serve.ttc import verify as verify_solutions
from lorabay.serve.validate import parse_request

log = logging.getLogger("lorabay.serve")

USAGE_MARK = b'"usage":{'
EVENT_END = b"\n\n"


async def generate(gateway: Gateway, request: Request, endpoint: str):
    """One generation request: authenticate, read and check the body, then answer it
    while watching the client: one that hangs up before its (non-streamed) answer
    cancels it, and the engine, seeing its connection close, aborts the generation."""
    timer = RequestTimer(gateway.metrics, endpoint)
    try:
        grant = gateway.authenticate(request.headers.get("authorization"))
        raw = await gateway.read_body(request)
        body = parse_request(raw, endpoint, gateway.max_model_len, gateway.max_n)
        plan = read_plan(body, endpoint, gateway.search_limits)  # best_of, search: ttc.py
    except ClientGone:
        timer.finish(CLIENT_CLOSED, "client_closed_request")
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it
    except LorabayError as error:
        timer.finish(error.http_status, error.code)
        return lorabay_error_response(error)
    timer.begin()  # in flight from here: the body is whole and valid
    work = asyncio.ensure_future(answer(gateway, request, endpoint, raw, body, grant, timer, plan))
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    if work.cancelled():
        timer.finish(CLIENT_CLOSED, "client_closed_request")
        return Response(status_code=CLIENT_CLOSED)
    return work.result()


async def wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body is read by then: nothing else is)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer(gateway: Gateway, request: Request, endpoint: str, raw, body, grant, timer, plan):
    lease = None
    streaming = False
    try:
        path = f"/v1/{endpoint}"
        forwarded = gateway.forwarded_by_peer(path, raw, request.headers)
        if gateway.too_busy_for(forwarded):  # the gateway that forwarded it answers it
            timer.finish(429, "busy")
            message = f"{gateway.spill_at} requests in flight here; answer it where it arrived"
            response = error_response(429, message, "busy")
            response.headers[BUSY] = "1"
            return response
        peer = await gateway.peer_for(body, forwarded)
        if peer is not None:  # another gateway is home to this adapter (--peers)
            relayed = await gateway.forward(peer, path, raw, request.headers)
            if relayed is not None:
                timer.forwarded(peer)
                return peer_response(relayed)
        if plan is not None:  # best-of-N or beam search with a verifier (serve/ttc.py)
            result = await answer_ttc(gateway, endpoint, body, plan, grant, timer)
            timer.finish(200)
            return AsciiJSONResponse(result)
        target, lease = await gateway.open_target(body, grant)
        timer.labels = target.labels
        body["model"] = target.engine_name if lease is None else lease.engine_name
        # Each key's own prefix cache: no tenant can tell another's prompts by its speed.
        body["cache_salt"] = gateway.cache_salt(grant)
        stream = body.get("stream") is True
        wants_usage = stream and ask_for_usage(body)
        response = await gateway.send(endpoint, body)
        if response.status_code == 404 and lease is not None:
            # The engine lost the adapter (it never should): load it again, once.
            await response.aclose()
            gateway.pool.forget(lease.key)
            gateway.pool.release(lease)
            lease = None
            target, lease = await gateway.open_target(body | {"model": target_ref(target)}, grant)
            response = await gateway.send(endpoint, body)
        if not stream or response.status_code != 200:
            return await finish_plain(gateway, response, timer)
        held, lease = lease, None  # the stream releases it when it ends
        streaming = True  # and finishes the timer
        return relay_response(StreamRelay(gateway, response, timer, held, wants_usage))
    except LorabayError as error:
        timer.finish(error.http_status, error.code)
        return lorabay_error_response(error)
    except Exception as error:  # a bug must cost one request, never the gateway
        log.exception("request failed")
        timer.finish(500, "internal_error")
        return error_response(500, f"internal error: {type(error).__name__}", "internal_error")
    finally:
        if lease is not None:
            gateway.pool.release(lease)
        if not streaming:  # cancelled: the client went away before its answer
            timer.finish(CLIENT_CLOSED, "client_closed_request")


def ask_for_usage(body: dict) -> bool:
    """Make a stream end with a usage event (the token metrics need it); whether the
    client asked for one itself. A client's own ``stream_options`` go on unchanged; for
    one that did not ask, only the final usage event is requested (never one per chunk),
    and the relay drops it again."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return True
    body["stream_options"] = {
        **(options or {}),
        "include_usage": True,
        "continuous_usage_stats": False,
    }
    return False


def target_ref(target) -> str:
    # The exact content this request was resolved to: a retry never picks another version.
    return f"{target.name}@{target.manifest.digest}"


async def finish_plain(gateway: Gateway, response, timer: RequestTimer) -> Response:
    try:
        content = await response.aread()
    except Exception as error:  # the engine died mid-answer
        gateway.supervisor.mark_down()
        down = engine_down(type(error).__name__)
        timer.finish(503, down.code)
        return lorabay_error_response(down)
    finally:
        await response.aclose()
    status = response.status_code
    if status == 200:
        try:
            usage = json.loads(content).get("usage")
            if isinstance(usage, dict):
                timer.usage(usage)
        except (ValueError, AttributeError):
            pass
        timer.finish(200)
        return Response(content, status_code=200, media_type="application/json")
    if status >= 500 and not await gateway.engine_answers():
        # Its engine core died under the request (vLLM answers 500): that is a 503, the
        # engine is down, not a bad gateway.
        gateway.supervisor.mark_down()
        down = engine_down(f"it failed while answering ({engine_answer(response)[:200]})")
        timer.finish(503, down.code)
        return lorabay_error_response(down)
    # The engine's own refusal (a prompt beyond the context, a field vLLM rejects): the
    # same message, in the gateway's error shape; its failures are a bad gateway.
    code = {400: "invalid_request_error", 404: "model_not_found"}.get(status, "engine_error")
    if status >= 500 and status != 503:
        status = 502
    timer.finish(status, code)
    return error_response(status, engine_answer(response), code, engine_error_param(content))


def engine_error_param(content: bytes) -> str | None:
    try:
        param = json.loads(content)["error"].get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return param if isinstance(param, str) else None


class StreamRelay:
    """One streamed answer: the engine's events relayed, then everything it holds let go
    (the engine response, the adapter lease, the in-flight gauge) exactly once, however
    it ends: finished, the engine dead midway, or the client gone before it started."""

    def __init__(self, gateway: Gateway, response, timer: RequestTimer, lease, wants_usage):
        self.gateway, self.response, self.timer = gateway, response, timer
        self.lease, self.wants_usage = lease, wants_usage
        self.status, self.code = CLIENT_CLOSED, "client_closed_request"  # until the body starts
        self.closed = False

    async def events(self):
        self.status, self.code = 200, None
        try:
            async for chunk in relay_events(
                self.response, self.wants_usage, self.timer.first_token, self.timer.usage
            ):
                yield chunk
        except Exception as error:  # the engine died mid-stream: the status line is sent
            self.gateway.supervisor.mark_down()
            down = engine_down(type(error).__name__)
            self.status, self.code = 503, "engine_unavailable"
            yield error_event(down)
        finally:
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.finish(self.status, self.code)
        try:
            await self.response.aclose()
        finally:
            if self.lease is not None:
                self.gateway.pool.release(self.lease)


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClosingStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however it ends, even when the body never
    started: a client that leaves first makes Starlette cancel the body before its generator
    ever runs, and a generator that never ran has no ``finally`` to run."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.on_close())


def relay_response(relay: StreamRelay) -> ClosingStream:
    return ClosingStream(
        relay.events(), relay.close, media_type="text/event-stream", headers=SSE_HEADERS
    )


def peer_response(response) -> ClosingStream:
    """A peer gateway's answer, passed through as it comes (status, type, bytes)."""
    headers = {k: v for k, v in response.headers.items() if k.lower() in SSE_HEADERS}
    return ClosingStream(
        response.aiter_raw(),
        response.aclose,
        status_code=response.status_code,
        media_type=response.headers.get("content-type"),
        headers=headers,
    )


def read_usage(event: bytes) -> dict | None:
    """The usage object of one SSE event (``data: {...}``), if it has one."""
    try:
        payload = json.loads(event.partition(b"data:")[2])
    except ValueError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage if isinstance(usage, dict) else None


async def relay_events(
    response: StreamedAnswer,
    client_wants_usage: bool,
    on_first: Callable[[], None],
    on_usage: Callable[[dict], None],
) -> AsyncIterator[bytes]:
    """The engine's SSE bytes, whole events at a time, minus a usage event we added.

    Usage is recorded once, at the end, from the last event that carried it: with
    ``continuous_usage_stats`` every event carries the running total.
    """
    pending = b""
    first = True
    usage = None
    try:
        async for chunk in response.aiter_raw():
            pending += chunk
            end = pending.rfind(EVENT_END)
            if end < 0:
                continue
            ready, pending = pending[: end + 2], pending[end + 2 :]
            if USAGE_MARK in ready:
                kept = []
                for event in ready.split(EVENT_END)[:-1]:
                    seen = read_usage(event) if USAGE_MARK in event else None
                    if seen is not None:
                        usage = seen
                        if not client_wants_usage and b'"choices":[]' in event:
                            continue  # the final usage event we asked for ourselves
                    kept.append(event + EVENT_END)
                ready = b"".join(kept)
                if not ready:
                    continue
            if first:
                on_first()
                first = False
            yield ready
        if pending:
            yield pending
    finally:
        if usage is not None:
            on_usage(usage)


def error_event(error: LorabayError) -> bytes:
    body = {"error": {"message": str(error), "type": "server_error", "code": error.code}}
    return b"data: " + json.dumps(body).encode() + EVENT_END


class RequestTimer:
    """Latency, TTFT and tokens of one request, recorded once at its end.

    A request counts as in flight (``lorabay_requests_in_flight``, the autoscaling
    signal) from :meth:`begin`, once its body is whole and valid, until it ends: a
    client that stalls its upload holds a connection, not a slot.
    """

    def __init__(self, metrics: GatewayMetrics, endpoint: str):
        self.metrics = metrics
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.labels = ("", "")
        self.counted = False
        self.done = False

    def begin(self) -> None:
        if not self.counted and not self.done:
            self.counted = True
            self.metrics.active += 1

    def _end(self) -> None:
        self.done = True
        if self.counted:
            self.metrics.active -= 1

    def first_token(self) -> None:
        self.metrics.ttft.labels(*self.labels).observe(time.perf_counter() - self.started)

    def usage(self, usage: dict) -> None:
        self.metrics.prompt_tokens.labels(*self.labels).inc(usage.get("prompt_tokens") or 0)
        self.metrics.generated_tokens.labels(*self.labels).inc(usage.get("completion_tokens") or 0)

    def forwarded(self, peer: str) -> None:
        """Sent on to ``peer``, which records the request itself."""
        if not self.done:
            self._end()
            self.metrics.forwarded.labels(peer).inc()

    def finish(self, status: int, code: str | None = None) -> None:
        if self.done:
            return
        self._end()
        self.metrics.requests.labels(*self.labels, self.endpoint, str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(*self.labels, code or str(status)).inc()
        else:
            self.metrics.latency.labels(*self.labels).observe(time.perf_counter() - self.started)


async def verify(gateway: Gateway, request: Request):
    """``/v1/verify``: a verifier scores the solutions the client sent (serve/ttc.py)."""
    timer = RequestTimer(gateway.metrics, "verify")
    try:
        grant = gateway.authenticate(request.headers.get("authorization"))
        body = read_verify_request(await gateway.read_body(request))
        timer.begin()
        result = await verify_solutions(gateway, body, grant, timer)
        timer.finish(200)
        return AsciiJSONResponse(result)
    except ClientGone:
        timer.finish(CLIENT_CLOSED, "client_closed_request")
        return Response(status_code=CLIENT_CLOSED)
    except LorabayError as error:
        timer.finish(error.http_status, error.code)
        return lorabay_error_response(error)
