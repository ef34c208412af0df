"""Where the gateway takes images from: data: URLs always; http(s) URLs only from the hosts the operator names
(--allowed-media-domains) and file URLs only under the folder the operator names (--allowed-local-media-path).
By default nothing is fetched: a server that fetched any URL a caller gave would let callers reach the server's
own network (SSRF) and files.

A fetch runs off the event loop (the request parser runs in a worker thread), is bounded in bytes and time, and
follows a redirect only to an allowed host."""

from __future__ import annotations

import copy
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from qwenpd.clients.chat_request import data_url
from qwenpd.errors import InvalidArgument

FETCH_TIMEOUT_S = 10.0  # one fetch, start to end
MAX_ITEMS = 1024  # images and video frames one request may name (URLs and data URLs alike)


class MediaFetcher:
    """`fetch(url, field) -> (bytes, media type)` under the operator's policy; InvalidArgument naming `field`."""

    def __init__(self, allowed_domains: tuple[str, ...] = (), allowed_local_path: str = "",
                 max_bytes: int = 20 << 20):
        self.domains = tuple(d.lower().strip() for d in allowed_domains if d.strip())
        self.root = Path(allowed_local_path).resolve() if allowed_local_path else None
        self.max_bytes = max_bytes
        self._items = self._bytes = 0  # fetched so far (for_request: per request)

    def for_request(self) -> "MediaFetcher":
        """A fetcher for one request: at most MAX_ITEMS items and `max_bytes` in all (each check names the item
        that passes the bound)."""
        fetcher = copy.copy(self)
        fetcher._items = fetcher._bytes = 0
        return fetcher

    def _count(self, data: bytes, field: str) -> None:
        self._items += 1
        self._bytes += len(data)
        if self._items > MAX_ITEMS:
            raise InvalidArgument(field, f"more than {MAX_ITEMS} images and video frames in one request")
        if self._bytes > self.max_bytes:
            raise InvalidArgument(field, f"the request's images come to more than {self.max_bytes} bytes")

    def _host_allowed(self, host: str) -> bool:
        host = host.lower()
        return any(host == d or host.endswith("." + d) for d in self.domains)

    def __call__(self, url: str, field: str) -> tuple[bytes, str]:
        if not isinstance(url, str):
            raise InvalidArgument(field, "the URL must be a string")
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            out = data_url(url, field)
        elif scheme == "file":
            out = self._file(url, field)
        elif scheme in ("http", "https"):
            out = self._http(url, field)
        else:
            raise InvalidArgument(field, f"unsupported URL scheme {scheme!r}: use a data: URL")
        self._count(out[0], field)
        return out

    def _file(self, url: str, field: str) -> tuple[bytes, str]:
        if self.root is None:
            raise InvalidArgument(field, "file URLs are not allowed on this server (--allowed-local-media-path)")
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise InvalidArgument(field, "the file is not under the allowed media path, or does not exist")
        if path.stat().st_size > self.max_bytes:
            raise InvalidArgument(field, f"the file is over {self.max_bytes} bytes (--max-image-bytes)")
        return path.read_bytes(), ""

    def _http(self, url: str, field: str) -> tuple[bytes, str]:
        host = urllib.parse.urlparse(url).hostname or ""
        if not self.domains or not self._host_allowed(host):
            raise InvalidArgument(field, f"fetching from {host or 'this URL'} is not allowed on this server "
                                         "(--allowed-media-domains); send the image as a data: URL")
        fetcher = self

        class _Redirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: N802 - urllib's name
                if not fetcher._host_allowed(urllib.parse.urlparse(newurl).hostname or ""):
                    raise InvalidArgument(field, "the URL redirects to a host that is not allowed")
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        opener = urllib.request.build_opener(_Redirects)
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        try:
            with opener.open(url, timeout=FETCH_TIMEOUT_S) as resp:
                mime = (resp.headers.get_content_type() or "").lower()
                chunks, size = [], 0
                while size <= self.max_bytes:  # in pieces: the whole fetch has one deadline, not each read
                    if time.monotonic() > deadline:
                        raise InvalidArgument(field, f"fetching the URL took over {FETCH_TIMEOUT_S:g} s")
                    piece = resp.read(min(1 << 20, self.max_bytes + 1 - size))
                    if not piece:
                        break
                    chunks.append(piece)
                    size += len(piece)
                data = b"".join(chunks)
        except InvalidArgument:
            raise
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise InvalidArgument(field, f"could not fetch the URL: {exc}") from None
        if len(data) > self.max_bytes:
            raise InvalidArgument(field, f"the fetched image is over {self.max_bytes} bytes (--max-image-bytes)")
        return data, mime if mime.startswith("image/") else ""
