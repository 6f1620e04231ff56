"""The dashboard's static files: the front end built from web/ (`make
dashboard`) into the package's ``static`` folder.

They are read once, when the server starts (a server whose build lacks them
does not start), and served with their content type, a strong ETag and
``Cache-Control: no-cache``: browsers keep a copy but revalidate it on each
load (a 304 costs one round trip), so a page never runs code older than the
server it talks to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final

from aiohttp import web

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
INDEX: Final = "index.html"
CACHE_CONTROL: Final = "no-cache"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


class Assets:
    """Every static file by its path under ``static/`` (``app.js``)."""

    def __init__(self, root: Traversable | None = None) -> None:
        root = root or resources.files("runcap_server.dashboard").joinpath("static")
        self._files: dict[str, Asset] = {}
        self._load(root, "")
        if INDEX not in self._files:
            raise ValueError(
                "the dashboard's static files are missing from the runcap_server package "
                "(run `make dashboard` in a source checkout)"
            )

    def _load(self, folder: Traversable, prefix: str) -> None:
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            name = prefix + entry.name
            if entry.is_dir():
                self._load(entry, name + "/")
                continue
            suffix = "." + entry.name.rpartition(".")[2]
            if suffix in CONTENT_TYPES:
                body = entry.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                self._files[name] = Asset(body, CONTENT_TYPES[suffix], etag)

    def names(self) -> list[str]:
        return sorted(self._files)

    def response(self, request: web.Request, name: str) -> web.Response:
        """The file `name` (404 when there is none), or 304 when the request's
        If-None-Match already names this version."""
        asset = self._files.get(name)
        if asset is None:
            raise web.HTTPNotFound(text=f"no such file: {name}")
        headers = {"ETag": asset.etag, "Cache-Control": CACHE_CONTROL}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = asset.content_type
        return web.Response(body=asset.body, headers=headers)
