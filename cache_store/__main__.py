"""`python -m qwenpd.cache_store --listen 127.0.0.1:0 --budget 8GiB ...`: run one cache store in the foreground."""

from __future__ import annotations

import logging

from qwenpd.cache_store.config import build_parser, config_from_args
from qwenpd.cache_store.server import serve


def main(argv: list[str] | None = None) -> int:
    """Bad flags: usage error, exit 2; a failure to start: one line, exit 1 (as `qwenpd serve cache`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
