"""`engine-server` / `python -m engine_server`: starts on SQLite (data/engine.db) with no arguments."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from engine_server.server import serve
from engine_server.settings import parse_args


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
