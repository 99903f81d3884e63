"""The gallery page (`gallery.html`, one self-contained file) as the API serves it at `GET /`."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

PAGE_FILE = "gallery.html"
# The page runs its own inline script and styles and calls only its own origin; pictures and downloads
# are presigned S3 URLs (https on AWS, the local cloud's http).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src http: https: data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


@cache
def page() -> str:
    return files("loraflow_api").joinpath(PAGE_FILE).read_text(encoding="utf-8")
