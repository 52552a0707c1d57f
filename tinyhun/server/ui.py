"""What a browser gets from `tinyhun serve`: the chat page at GET / (static/chat.html, one file, no build step; it
talks to the server's own /v1 API, so it is same-origin) and, with --cors ORIGIN, the CORS headers that let a page
served from another origin call the API.

The page is read once. The reply styles it offers and the default temperature are filled in when it is first
served (styles.py), so that they are never out of step with the server's.
"""
import functools
import json
import re
from importlib import resources

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse

from ..errors import TinyhunError
from ..styles import DEFAULT_TEMPERATURE, STYLES

CONFIG_SLOT = "/*CONFIG*/{}"
# inline script and style only: the page loads nothing from anywhere, and nothing it shows is run as code
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.cache
def page_text():
    text = resources.files("tinyhun").joinpath("server/static/chat.html").read_text(encoding="utf-8")
    config = {"styles": sorted(STYLES), "temperature": DEFAULT_TEMPERATURE}
    return text.replace(CONFIG_SLOT, json.dumps(config))


async def page(request):
    return HTMLResponse(page_text(), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


def cors(origins):
    """The middleware answering browsers' preflights (OPTIONS) and adding Access-Control-Allow-* headers for the
    given origins ("*": any); none when no origin is given (a browser then keeps other origins' pages out). Any
    request header is allowed (clients add their own, e.g. the openai library's x-stainless-*)."""
    if not origins:
        return []
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
            raise TinyhunError(f"--cors {origin}: expected an origin such as https://app.example.com or "
                               "http://localhost:3000 (scheme, host, port; no path), or * for any")
    return [Middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], max_age=600,
                       expose_headers=["Retry-After", "X-Process-Time"])]
