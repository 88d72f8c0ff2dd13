"""The chat page that `mistol serve` shows at `/`, and the two endpoints it needs beyond the
OpenAI API: `GET /api/config` (what the page should offer) and, only with `--allow-code`,
`POST /api/run` (run a Python block the person confirmed, in the same sandbox as the
terminal chat).

The page is static (mistol/server/web/, plain JavaScript, no build step). Model output is
untrusted there: the page builds the DOM from text nodes, and the Content-Security-Policy
below forbids inline scripts and any other origin, so even a rendering slip cannot run
script or send the conversation away.

Running code is the dangerous part, so `/api/run` is guarded four ways: it exists only
with `--allow-code`; it needs the API key when one is set (and `mistol serve` refuses
`--allow-code` on a non-loopback address without one); it needs the run token, a random
secret made at each start and shown only in the page's URL that `mistol serve` prints
(`/?token=...`, as Jupyter does), so that another account on this machine, which can reach
loopback too, cannot run code as the person who started the server; and the request must
come from this page: the Origin header must name the host the request was sent to, and
without a key that host must be a loopback name. The last check stops another web site
from posting code (cross-site requests carry their own Origin) and DNS rebinding (a foreign
name that resolves to 127.0.0.1 is refused). The page takes the token from its address,
keeps it in sessionStorage, removes it from the address bar and sends it as
`X-Mistol-Run-Token` with each run.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import secrets
import threading
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import MistolError
from ..sandbox.code_turn import CODE_SYSTEM_PROMPT
from ..sandbox.codeblocks import format_output
from ..sandbox.sandbox import Sandbox, SandboxLimits
from .protocol import APIError

STATIC_DIR = Path(__file__).with_name("web")
STATIC_FILES = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css",
                "icon.svg": "image/svg+xml"}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_CODE_CHARS = 100_000
MAX_SANDBOXES = 4  # conversations whose code state (variables, imports) is kept at once
RUN_TOKEN_HEADER = "X-Mistol-Run-Token"


def add_web_routes(app: FastAPI, server) -> None:
    """The page and its endpoints, on the app `create_app` builds (`server` is its `_Server`)."""
    options = server.options

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC_FILES:  # a fixed list: no path ever reaches the file system
            raise APIError(404, f"/static/{name}: no such file", code="not_found")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    @app.get("/api/config")
    async def config():
        return {
            "model": server.model_id,
            "max_context": server.scheduler.max_context,
            "api_key_required": options.api_key is not None,
            "allow_code": options.allow_code,
            "code_system_prompt": CODE_SYSTEM_PROMPT if options.allow_code else None,
        }

    if not options.allow_code:
        return  # no run endpoint at all: /api/run is a 404 like any unknown path

    runs = CodeRuns(options.code_limits or SandboxLimits())
    server.on_close.append(runs.close)
    server.run_token = secrets.token_urlsafe(32)  # new at each start; `mistol serve` prints it in the page's URL

    @app.post("/api/run", dependencies=[Depends(server.authorize)])
    async def run(request: Request):
        check_same_origin(request, key_required=options.api_key is not None)
        check_run_token(request, server.run_token)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise APIError(415, "send the code as application/json", code="unsupported_media_type")
        body = await server.read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        code, conversation = body.get("code"), body.get("conversation", "")
        if not isinstance(code, str) or not code.strip():
            raise APIError(400, "code: a non-empty string is required", "code")
        if len(code) > MAX_CODE_CHARS:
            raise APIError(400, f"code: longer than {MAX_CODE_CHARS} characters", "code")
        if not isinstance(conversation, str) or len(conversation) > 100:
            raise APIError(400, "conversation: a string id of at most 100 characters", "conversation")
        try:
            result = await run_in_threadpool(runs.run, conversation, code)
        except MistolError as e:
            return JSONResponse({"error": {"message": f"the code could not be run: {e}", "type": "sandbox_error",
                                           "param": None, "code": "sandbox_error"}}, status_code=500)
        return {"output": result.output, "feedback": format_output(result.output), "ok": result.ok,
                "timed_out": result.timed_out, "restarted": result.restarted}


def check_same_origin(request: Request, key_required: bool) -> None:
    """Refuse a request that did not come from this server's own page (see the module's docstring)."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is None or urlsplit(origin).netloc.lower() != host.lower() or urlsplit(origin).scheme not in (
            "http", "https"):
        raise APIError(403, "code can only be run from this server's own chat page (Origin does not match Host)",
                       code="forbidden_origin")
    if not key_required and not _is_loopback_name(urlsplit(f"//{host}").hostname or ""):
        raise APIError(403, f"code can only be run through a loopback address without an API key (Host: {host})",
                       code="forbidden_host")


def check_run_token(request: Request, token: str) -> None:
    """Refuse a run without this start's token (compared in constant time)."""
    given = request.headers.get(RUN_TOKEN_HEADER, "")
    if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):
        raise APIError(403, "running code needs this server's run token: open the chat page through the URL "
                       "that `mistol serve --allow-code` printed (http://.../?token=...)", code="forbidden_token")


def _is_loopback_name(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class CodeRuns:
    """One sandbox per conversation (so its variables live on between blocks), the least
    recently used idle one closed beyond `MAX_SANDBOXES`. A sandbox runs one block at a
    time. A sandbox that is running code is never closed under it: when every kept one is
    busy, a new conversation is told to retry (503)."""

    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self._sandboxes: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()

    def run(self, conversation: str, code: str):
        with self._lock:
            entry = self._sandboxes.get(conversation)
            evicted = None
            if entry is None:
                if len(self._sandboxes) >= MAX_SANDBOXES:
                    evicted = self._evict_idle()
                entry = self._sandboxes[conversation] = _Entry(Sandbox(self.limits))
            self._sandboxes.move_to_end(conversation)
            entry.users += 1  # from here on, no other request closes it
        try:
            if evicted is not None:
                evicted.close()
            with entry.lock:
                return entry.sandbox.run(code)
        finally:
            with self._lock:
                entry.users -= 1

    def _evict_idle(self) -> Sandbox:
        """Take the least recently used sandbox that no request is using out (the caller closes it)."""
        for conversation, entry in self._sandboxes.items():
            if entry.users == 0:
                del self._sandboxes[conversation]
                return entry.sandbox
        raise APIError(503, f"{MAX_SANDBOXES} conversations are running code already; retry when one has "
                       "finished", code="server_busy")

    def close(self) -> None:
        with self._lock:
            sandboxes = [e.sandbox for e in self._sandboxes.values()]
            self._sandboxes.clear()
        for sandbox in sandboxes:
            sandbox.close()


class _Entry:
    """A conversation's sandbox, the lock that runs its blocks one at a time, and how many
    requests are using it (running or waiting their turn)."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.lock = threading.Lock()
        self.users = 0
