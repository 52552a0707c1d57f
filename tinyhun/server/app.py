"""The HTTP application (starlette): routes, the API key, body limits, errors in OpenAI's shape, and the model
loading in the background so that /health can answer 503 until it is ready.

The server keeps no state between requests that a load balancer would need to know about (a slot's cached prefix
only saves work), so N replicas behind any HTTP balancer scale it out.
"""
import asyncio
import hmac
import json
import sys
import threading
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..content_filter import ContentFilter
from ..errors import TinyhunError
from ..model import with_adapter
from . import completions_api, openai_api, ui
from .metrics import Metrics
from .options import Settings
from .scheduler import Engine
from .schemas import ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse

OPEN_PATHS = ("/health", "/metrics", "/")   # no API key: what a load balancer and a scraper read, and the chat
# page (static: it asks for the key, and sends it with its own API calls)




class Server:
    """The app's state: the models (the base, then each adapter over it) and the engine once loaded."""

    def __init__(self, load, settings):
        self.settings, self._load = settings, load
        self.model_name, self.max_tokens = None, settings.max_tokens
        self.model = self.engine = None
        self.models = {}               # id -> Model, the base's first
        flt = settings.content_filter
        self.content_filter = ContentFilter.load() if flt is True else flt or None
        self.load_error = None
        self.metrics = Metrics(lambda: None if self.engine is None else self.engine.state())

    def load(self, engine_thread=True):
        try:
            model, name = self._load()
            base_name = self.settings.model_name or name
            models = {base_name: model}
            for adapter, folder in self.settings.adapters.items():
                if adapter in models:
                    raise TinyhunError(f"--adapter {adapter}={folder}: {adapter!r} is the base model's id; "
                                       "name the adapter otherwise")
                # side path: every adapter shares the base's arrays (merged, each would be a copy of the model)
                models[adapter] = with_adapter(model, folder, mode="side", base_name=name)
            for m in models.values():
                _warm(m)
            self.engine = Engine(model, self.settings.slots, self.settings.queue, self.settings.max_context,
                                 thread=engine_thread)
            self.models, self.model_name = models, base_name
            self.model = model
        except Exception as e:   # noqa: BLE001 - /health reports it; the process stays up to say so
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, TinyhunError) else str(e)
            # and in the log: whoever started the server sees why /health says 503
            print(f"tinyhun serve: the model failed to load: {self.load_error}", file=sys.stderr, flush=True)

    def ready(self):
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.model is None:
            raise ApiError(503, "the model is loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "2"})

    def model_named(self, name):
        """The Model a request's `model` names; 404 in OpenAI's shape for an id this server does not serve."""
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"model {name!r} not found: this server serves {', '.join(map(repr, self.models))} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        return model


def _warm(model):
    """A prefill and a decode step, so that /health says ready only once the kernels are compiled (or read
    back out of the Numba cache) and the first request does not wait for them."""
    cache = model.new_cache(3)
    model.forward(cache, [0, 0])
    model.forward(cache, [0])


def _json(obj, status=200, headers=None):
    return JSONResponse(obj, status_code=status, headers=headers)


def _error(e: ApiError):
    return _json(e.body(), e.status, e.headers)


async def _body(request: Request, limit):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413 if length.isdigit() else 400,
                       f"request body of {length} bytes is over this server's limit of {limit} bytes"
                       if length.isdigit() else f"Content-Length: {length!r} is not a number")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over this server's limit of {limit} bytes")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


async def _until_disconnect(request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(request, coro):
    """Await a handler; a client that goes away before a whole (non-streaming) answer cancels it."""
    task = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)
    return task.result()


def create_app(load, settings: Settings, background=True) -> Starlette:
    """The ASGI app. load() -> (Model, its name) and the engine run in background threads started at startup;
    background=False leaves both to the caller (app.state.server.load(engine_thread=False), then .engine.run())."""
    server = Server(load, settings)

    def endpoint(route, handler, needs_model=True):
        async def run(request: Request):
            started = time.monotonic()
            try:
                if route not in OPEN_PATHS and settings.api_key is not None:
                    _check_key(request, settings.api_key)
                if needs_model:
                    server.ready()
                response = await handler(request)
            except ApiError as e:
                response = _error(e)
            except TinyhunError as e:
                response = _error(ApiError(400, str(e)))
            server.metrics.requests.labels(route, str(response.status_code)).inc()
            response.headers.setdefault("X-Process-Time", f"{time.monotonic() - started:.4f}")
            return response
        return run

    async def generation(request, schema, handler):
        req = parse(schema, await _body(request, settings.max_body))
        result = await (handler(server, req) if req.stream else _answer(request, handler(server, req)))
        if isinstance(result, Response):
            return result
        if isinstance(result, dict):
            return _json(result)
        return _EventStream(result)

    async def chat(request):
        return await generation(request, ChatRequest, openai_api.chat)

    async def completions(request):
        return await generation(request, CompletionRequest, completions_api.completions)

    async def models(request):
        return _json({"object": "list", "data": [_model_card(server, name) for name in server.models]})

    async def model(request):
        name = request.path_params["name"]
        server.model_named(name)
        return _json(_model_card(server, name))

    async def health(request):
        if server.load_error is not None:
            return _json({"status": "error", "message": server.load_error}, 503)
        if server.engine is None:
            return _json({"status": "loading"}, 503, {"Retry-After": "2"})
        e = server.engine
        return _json({"status": "ok", "model": server.model_name, "slots": e.slots, "busy_slots": e.busy_slots(),
                      "queue_depth": e.queue_depth(), "queue_size": e.queue_size})

    async def metrics(request):
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    async def tokenize(request):
        req = parse(TokenizeRequest, await _body(request, settings.max_body))
        if req.model is not None:
            server.model_named(req.model)
        tok = server.model.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            text = tok.render_chat([{"role": m.role, "content": m.text()} for m in req.messages])
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return _json({"tokens": ids, "count": len(ids), "max_model_len": server.engine.max_context})

    async def detokenize(request):
        req = parse(DetokenizeRequest, await _body(request, settings.max_body))
        if req.model is not None:
            server.model_named(req.model)
        vocab = server.model.config.vocab_size
        if req.tokens and max(req.tokens) >= vocab:
            raise ApiError(400, f"tokens: id {max(req.tokens)} out of range [0, {vocab})", param="tokens")
        return _json({"prompt": server.model.tokenizer.decode(req.tokens)})

    async def tokenizer_info(request):
        # vLLM's endpoint, what lm-evaluation-harness's remote tokenizer checks for before it uses /tokenize
        tok = server.model.tokenizer

        def text(i):
            return None if i is None else tok.decode([i], skip_special_tokens=False)
        return _json({"eos_token": text(min(tok.stop_ids, default=None)), "bos_token": text(tok.bos_id),
                      "pad_token": None, "model_max_length": server.engine.max_context, "vocab_size": tok.vocab_size})

    routes = [
        Route("/v1/chat/completions", endpoint("/v1/chat/completions", chat), methods=["POST"]),
        Route("/v1/completions", endpoint("/v1/completions", completions), methods=["POST"]),
        Route("/v1/models", endpoint("/v1/models", models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint("/v1/models/{name}", model), methods=["GET"]),
        Route("/tokenize", endpoint("/tokenize", tokenize), methods=["POST"]),
        Route("/detokenize", endpoint("/detokenize", detokenize), methods=["POST"]),
        Route("/tokenizer_info", endpoint("/tokenizer_info", tokenizer_info), methods=["GET"]),
        Route("/health", endpoint("/health", health, needs_model=False), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", metrics, needs_model=False), methods=["GET"]),
    ]
    if settings.ui:
        routes.append(Route("/", endpoint("/", ui.page, needs_model=False), methods=["GET"]))

    @asynccontextmanager
    async def lifespan(app):
        if background:
            threading.Thread(target=server.load, name="tinyhun-load", daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.close()

    async def http_error(request, exc: HTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, exc.detail)
        return _error(ApiError(exc.status_code, message, headers=dict(exc.headers or {})))

    async def server_error(request, exc):   # a bug: still an OpenAI-shaped answer, the traceback in the log
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    app = Starlette(routes=routes, lifespan=lifespan, middleware=ui.cors(settings.cors),
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app


class _EventStream(StreamingResponse):
    """Server-sent events of an openai_api.Streamed, whose run is cancelled when the response ends, however."""

    def __init__(self, streamed):
        super().__init__(streamed.chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.streamed = streamed

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.streamed.close()


def _check_key(request, key):
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key",
                       type_="authentication_error")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "wrong API key", code="invalid_api_key", type_="authentication_error")


def _model_card(server, name):
    card = {"id": name, "object": "model", "created": 0, "owned_by": "tinyhun",
            "max_model_len": server.engine.max_context}
    if name != server.model_name:   # an adapter: its base, as vLLM lists a LoRA module
        card.update(parent=server.model_name, root=str(server.settings.adapters[name]))
    return card
