"""The explorer's local web server and its self-contained HTML export.

Python's own ``http.server`` serves the page (a handful of requests from one person's browser
needs nothing more). It is bound to 127.0.0.1 and answers only requests whose ``Host`` header
names this machine, so a web page elsewhere cannot reach it through DNS rebinding; request bodies
are capped at :data:`MAX_BODY` bytes. Every error the user can cause comes back as one JSON line
``{"error": ...}`` that the page shows inline, never a stack trace.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from rnnkit.explore.analysis import MAX_SYMBOLS, Analysis, Explorer, InputError, to_json

MAX_BODY = 4 * 1024 * 1024  # bytes: 20,000 symbols of any script fit many times over
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MAX_HTML_VALUES = 48_000_000  # bytes of float32 values one saved page may embed
KEPT = 2  # analyses kept for their values (the page shows one); older ones are dropped


def plotly_js() -> str:
    """plotly.js as the plotly Python package ships it (no CDN: the page works offline)."""
    try:
        import plotly
    except ModuleNotFoundError:
        raise ValueError("rnnkit explore draws with plotly.js from the plotly package: "
                         "pip install 'rnnkit[explore]'") from None
    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text("utf-8")


def asset(name: str) -> str:
    return resources.files("rnnkit.explore").joinpath("static", name).read_text("utf-8")


def page(explorer: Explorer, embedded: dict[str, Any] | None = None) -> str:
    """The page's HTML: served (assets by URL) or self-contained (everything inline)."""
    config = {"task": explorer.task, "input": explorer.input_kind, "maxSymbols": MAX_SYMBOLS,
              "run": str(getattr(explorer.checkpoint, "path", ""))}
    html = asset("index.html")
    if embedded is None:
        scripts = '<script src="plotly.min.js"></script>\n<script src="app.js"></script>'
        style = '<link rel="stylesheet" href="app.css">'
    else:
        config["embedded"] = embedded
        # "</" would end the inline script early: JSON allows escaping the slash
        scripts = ("<script>" + plotly_js().replace("</script", "<\\/script") + "</script>\n"
                   "<script>" + asset("app.js") + "</script>")
        style = "<style>" + asset("app.css") + "</style>"
    settings = "<script>window.RNNKIT = " + to_json(config).replace("</", "<\\/") + ";</script>"
    return (html.replace("<!--STYLE-->", style)
            .replace("<!--SCRIPTS-->", settings + "\n" + scripts))


def write_html(explorer: Explorer, text: str, path: str | Path) -> Path:
    """One offline HTML file showing ``text`` (all activation values inside)."""
    from rnnkit.train.atomic import write_text

    analysis = explorer.analyse(text)
    size = sum(value.numel() * 4 for _, trace in analysis.traces for value in trace.values.values())
    if size > MAX_HTML_VALUES:  # base64 adds a third; browsers struggle past ~100 MB of script
        raise InputError(f"the page would hold {size / 1e6:.0f} MB of activations (at most "
                         f"{MAX_HTML_VALUES / 1e6:.0f} MB); give a shorter --text, or serve it")
    path = Path(path)
    write_text(path, page(explorer, analysis.embedded()))
    return path


class ExplorerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.explorer = explorer
        self.analyses: dict[str, Analysis] = {}
        self.counter = 0
        self.lock = threading.Lock()  # one model run at a time; the dict too
        self.default_text: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def analyse(self, text: str) -> dict[str, Any]:
        with self.lock:
            analysis = self.explorer.analyse(text)
            self.counter += 1
            key = str(self.counter)
            self.analyses[key] = analysis
            for old in list(self.analyses)[:-KEPT]:
                del self.analyses[old]
        return {"id": key, **analysis.summary()}

    def default_input(self) -> str:
        with self.lock:
            if self.default_text is None:
                self.default_text = self.explorer.default_input()
            return self.default_text


_VALUES = re.compile(r"^/api/values/(\d+)/(\d+)/([a-z][a-z0-9]?)$")  # h, c, … f1, f2


class _Handler(BaseHTTPRequestHandler):
    server: ExplorerServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the terminal shows the URL; one line per request would bury it

    def _local(self) -> bool:
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name in LOCAL_HOSTS:
            return True
        self._send(403, to_json({"error": f"this explorer answers only local requests, not "
                                          f"Host {host!r}"}), "application/json")
        return False

    def _send(self, status: int, body: str | bytes, kind: str) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, to_json({"error": message}), "application/json")

    def do_GET(self) -> None:
        if not self._local():
            return
        path = self.path.split("?", 1)[0]
        statics = {"/app.js": "text/javascript", "/app.css": "text/css"}
        try:
            if path in ("/", "/index.html"):
                self._send(200, page(self.server.explorer), "text/html; charset=utf-8")
            elif path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            elif path == "/plotly.min.js":
                self._send(200, plotly_js(), "text/javascript")
            elif path in statics:
                self._send(200, asset(path[1:]), statics[path] + "; charset=utf-8")
            elif path == "/api/default":
                self._send(200, to_json(self.server.analyse(self.server.default_input())),
                           "application/json")
            elif match := _VALUES.match(path):
                key, trace, quantity = match.groups()
                analysis = self.server.analyses.get(key)
                if analysis is None:
                    self._error(404, "that analysis is gone; run the input again")
                    return
                try:
                    values = analysis.values(int(trace), quantity)
                except (KeyError, IndexError):
                    self._error(404, f"no quantity {quantity!r} in trace {trace}")
                    return
                self._send(200, values.numpy().tobytes(), "application/octet-stream")
            else:
                self._error(404, f"no page {path}")
        except InputError as error:
            self._error(400, str(error))
        except Exception as error:  # the page shows one line; the terminal keeps the details
            self.server.handle_error(self.request, self.client_address)
            self._error(500, f"internal error: {type(error).__name__}: {error}")

    def do_POST(self) -> None:
        if not self._local():
            return
        if self.path != "/api/analyse":
            self._error(404, f"no endpoint {self.path}")
            return
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "the request has no Content-Length")
            return
        if size > MAX_BODY:
            self.close_connection = True  # the unread body must not be taken for a request
            self._error(413, f"the input is {size:,} bytes; the explorer takes at most "
                             f"{MAX_BODY:,}")
            return
        body = self.rfile.read(size)
        try:
            try:
                request = json.loads(body.decode("utf-8"))
                text = request["input"]
                if not isinstance(text, str):
                    raise TypeError
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise InputError('the request must be JSON {"input": "..."}') from None
            self._send(200, to_json(self.server.analyse(text)), "application/json")
        except InputError as error:
            self._error(400, str(error))
        except Exception as error:
            self.server.handle_error(self.request, self.client_address)
            self._error(500, f"internal error: {type(error).__name__}: {error}")


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 0) -> ExplorerServer:
    """A started server (in a daemon thread); ``server.shutdown()`` stops it."""
    server = ExplorerServer(explorer, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
