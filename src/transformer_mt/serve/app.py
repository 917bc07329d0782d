"""The HTTP API of ``tmt-serve`` (FastAPI): translation (LibreTranslate-compatible and a
native one with scores), attention weights, health, Prometheus metrics, the web page.

Every request body is read with a size cap, checked to be UTF-8 JSON of the right shape and
within the limits, and refused with a 4xx JSON ``{"error": ...}`` that says what was wrong
otherwise; the server goes on serving. Sentences of concurrent requests are decoded
together (:class:`~transformer_mt.serve.batcher.MicroBatcher`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transformer_mt.decoding.search import SearchOptions
from transformer_mt.serve.batcher import MicroBatcher
from transformer_mt.serve.engine import Engine
from transformer_mt.serve.html import page


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the flags of tmt-serve)."""

    max_chars: int = 2000  # characters per input sentence
    max_inputs: int = 64  # sentences per request
    max_batch_tokens: int = 4096  # source tokens per decoding batch
    batch_timeout_ms: float = 50.0  # the longest a batch waits for the last one's clients
    max_beam: int = 16
    max_attention_tokens: int = 128  # source subwords /v1/attention explains (answer ∝ square)

    @property
    def max_body_bytes(self) -> int:
        """Room for max_inputs strings of max_chars characters, JSON-escaped, and the rest."""
        return self.max_inputs * (12 * self.max_chars + 8) + 4096  # \uXXXX\uXXXX per char


DRAIN_BYTES = 16 * 2**20  # a refused body up to this size is read (and dropped) first


class ClientError(Exception):
    """A request the server refuses: a status (4xx) and what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LibreTranslateRequest(_Strict):
    """LibreTranslate's /translate: ``q`` one text or a list; ``alternatives`` extra n-best."""

    model_config = ConfigDict(strict=True, extra="ignore")  # api_key, format ... are ignored
    q: str | list[str]
    source: str
    target: str
    alternatives: int = Field(0, ge=0, le=15)


class TranslateRequest(_Strict):
    """/v1/translate: inputs and, optionally, search settings (else the server's); a
    multilingual model needs the ``target`` language."""

    inputs: list[str]
    target: str | None = None
    beam_size: int | None = Field(None, ge=1, le=64)
    alpha: float | None = Field(None, ge=0, le=10)
    nbest: int | None = Field(None, ge=1, le=64)


class AttentionRequest(_Strict):
    """/v1/attention: one sentence (and its ``target`` language, for a multilingual model);
    ``beam_size`` and ``alpha`` (else the server's) pick the translation it explains, as
    they would in /v1/translate."""

    input: str
    target: str | None = None
    beam_size: int | None = Field(None, ge=1, le=64)
    alpha: float | None = Field(None, ge=0, le=10)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body read by hand (so that every error is ours to word)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


class Metrics:
    """Prometheus counters of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tmt_requests",
            "HTTP requests by path and status",
            ["path", "status"],
            registry=self.registry,
        )
        self.sentences = Counter("tmt_sentences", "sentences translated", registry=self.registry)
        self.latency = Histogram(
            "tmt_request_seconds",
            "request latency",
            ["path"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch = Histogram(
            "tmt_batch_sentences",
            "sentences per decoding batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes, declared or sent. A body declared too
    large but not huge is read and dropped first, so that a client that sends it all
    before reading the answer gets the 413 instead of a reset connection."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= DRAIN_BYTES:
            async for _ in request.stream():
                pass
        raise ClientError(413, f"request body of {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ClientError(413, f"request body over {limit} bytes")
    return bytes(body)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    """``body`` as ``model``; a 400 naming the first problems otherwise."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(400, f"the body is not valid UTF-8 (byte {e.start})") from e
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        raise ClientError(400, "; ".join(problems)) from e


def _check_inputs(texts: list[str], limits: Limits, field: str) -> None:
    """Non-empty, within the limits."""
    if not texts:
        raise ClientError(400, f"{field}: no input")
    if len(texts) > limits.max_inputs:
        raise ClientError(
            413, f"{field}: {len(texts)} inputs; at most {limits.max_inputs} per request"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise ClientError(400, f"{field}[{i}]: empty input")
        if len(text) > limits.max_chars:
            raise ClientError(
                413, f"{field}[{i}]: {len(text)} characters; at most {limits.max_chars}"
            )


def _check_lengths(engine: Engine, texts: list[str], field: str) -> None:
    """A 413 naming the first input with more subwords than the model reads (it would be
    truncated, and its translation with it)."""
    for i, text in enumerate(texts):
        n_subwords = engine.count_tokens(text) - 1  # without EOS
        if n_subwords > engine.max_subwords:
            raise ClientError(
                413,
                f"{field}[{i}]: {n_subwords} subwords; the model reads at most "
                f"{engine.max_subwords}",
            )


def _options(engine: Engine, limits: Limits, **given: Any) -> SearchOptions:
    """The server's search with the request's settings; a 400 if they make no sense."""
    changes = {k: v for k, v in given.items() if v is not None}
    if "nbest" in changes and "beam_size" not in changes:
        changes["beam_size"] = max(engine.options.beam_size, changes["nbest"])
    if "beam_size" in changes and "nbest" not in changes:  # the server's n-best, if it fits
        changes["nbest"] = min(engine.options.nbest, changes["beam_size"])
    if changes.get("beam_size", 1) > max(limits.max_beam, engine.options.beam_size):
        raise ClientError(400, f"beam_size (or nbest): at most {limits.max_beam}")
    try:
        return dataclasses.replace(engine.options, **changes)
    except ValueError as e:
        raise ClientError(400, str(e)) from e


def _target(engine: Engine, source: str, target: str | None) -> str | None:
    """The target language to ask the model for; a 400 naming the model's directions if it
    does not translate ``source`` into ``target``."""
    if target is None and not engine.multilingual:
        return None
    if target is None:
        raise ClientError(400, f"target: this model is multilingual; name one of {engine.targets}")
    try:
        return engine.check_direction(source, target)
    except ValueError as e:
        raise ClientError(400, str(e)) from e


def create_app(
    engine: Engine, limits: Limits | None = None, executor: ThreadPoolExecutor | None = None
) -> FastAPI:
    """The server's app around a loaded ``engine``, decoding in ``executor``'s one thread
    (default: a new one)."""
    limits = limits or Limits()
    metrics = Metrics()
    batcher = MicroBatcher(
        engine.decode,
        engine.count_tokens,
        limits.max_batch_tokens,
        limits.batch_timeout_ms / 1000,
        on_batch=metrics.batch.observe,
        executor=executor,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            try:
                await batcher.stop()
            finally:
                engine.close()  # after the decoding in progress, if any

    app = FastAPI(
        title="transformer_mt",
        summary=f"{_directions(engine)} translation with {engine.model_path}",
        lifespan=lifespan,
    )
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
    page_html = page()

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as e:  # counted here; the app's handler answers with its JSON
            path = request.url.path if request.url.path in KNOWN_PATHS else "other"
            metrics.requests.labels(path, "500").inc()
            raise e
        path = request.url.path if request.url.path in KNOWN_PATHS else "other"
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    async def translate_texts(
        texts: list[str], options: SearchOptions, tgt_lang: str | None
    ) -> list[Any]:
        results = await batcher.translate(texts, options, tgt_lang)
        metrics.sentences.inc(len(texts))
        return results

    @app.post("/translate", openapi_extra=_schema(LibreTranslateRequest))
    async def libretranslate(request: Request) -> JSONResponse:
        """LibreTranslate-compatible: ``{"q", "source", "target", "alternatives"}`` ->
        ``{"translatedText", "alternatives"}`` (a list for a list of ``q``)."""
        req = _parse(LibreTranslateRequest, await _read_body(request, limits.max_body_bytes))
        tgt_lang = _target(engine, req.source, req.target)
        texts = [req.q] if isinstance(req.q, str) else req.q
        _check_inputs(texts, limits, "q")
        _check_lengths(engine, texts, "q")
        nbest = 1 + req.alternatives
        options = _options(engine, limits, nbest=nbest) if req.alternatives else engine.options
        results = await translate_texts(texts, options, tgt_lang)
        best = [r[0][0] for r in results]
        body: dict[str, Any] = {"translatedText": best[0] if isinstance(req.q, str) else best}
        if req.alternatives:
            alternatives = [[text for text, _ in r[1:]] for r in results]
            body["alternatives"] = alternatives[0] if isinstance(req.q, str) else alternatives
        return JSONResponse(body)

    @app.post("/v1/translate", openapi_extra=_schema(TranslateRequest))
    async def translate(request: Request) -> JSONResponse:
        """``{"inputs": [...], "beam_size", "alpha", "nbest"}`` -> per input, its n-best list
        of ``{"text", "score"}`` (score: log-probability over the length penalty; null for
        greedy search)."""
        req = _parse(TranslateRequest, await _read_body(request, limits.max_body_bytes))
        _check_inputs(req.inputs, limits, "inputs")
        _check_lengths(engine, req.inputs, "inputs")
        tgt_lang = _target(engine, "auto", req.target)
        options = _options(
            engine, limits, beam_size=req.beam_size, alpha=req.alpha, nbest=req.nbest
        )
        results = await translate_texts(req.inputs, options, tgt_lang)
        outputs = [[{"text": text, "score": score} for text, score in r] for r in results]
        return JSONResponse(
            {"outputs": outputs, "beam_size": options.beam_size, "alpha": options.alpha}
        )

    @app.post("/v1/attention", openapi_extra=_schema(AttentionRequest))
    async def attention(request: Request) -> JSONResponse:
        """One sentence -> its subwords on both sides, its translation, and every attention
        weight: ``encoder`` [layer][head][i][j] (source self), ``decoder`` (target self,
        masked) and ``cross`` (target→source)."""
        req = _parse(AttentionRequest, await _read_body(request, limits.max_body_bytes))
        if engine.attention is None:
            raise ClientError(400, f"attention weights need --engine torch, not {engine.name}")
        _check_inputs([req.input], limits, "input")
        n_tokens = engine.count_tokens(req.input)
        if n_tokens > limits.max_attention_tokens:
            raise ClientError(
                413,
                f"input: {n_tokens} subwords; attention weights are returned for at most "
                f"{limits.max_attention_tokens}",
            )
        _check_lengths(engine, [req.input], "input")
        tgt_lang = _target(engine, "auto", req.target)
        options = _options(engine, limits, beam_size=req.beam_size, alpha=req.alpha, nbest=1)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            batcher.executor, engine.attention, req.input, options, tgt_lang
        )
        metrics.sentences.inc()
        return JSONResponse(result)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Alive, and what it serves."""
        return {
            "status": "ok",
            "engine": engine.name,
            "model": engine.model_path,
            "source": ",".join(engine.sources),
            "target": ",".join(engine.targets),
            "pairs": [f"{src}-{tgt}" for src, tgt in engine.pairs],
            "multilingual": engine.multilingual,
            "beam_size": engine.options.beam_size,
            "alpha": engine.options.alpha,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format: requests by path and status, sentences, latency and
        decoding batch size histograms."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def web_page() -> HTMLResponse:
        """The web page: translate, and explore the attention."""
        return HTMLResponse(page_html)

    return app


def _directions(engine: Engine) -> str:
    return ", ".join(f"{src}→{tgt}" for src, tgt in engine.pairs)


KNOWN_PATHS = {"/translate", "/v1/translate", "/v1/attention", "/health", "/metrics", "/", "/docs"}
