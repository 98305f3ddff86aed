"""`engine-server` / `python -m engine_server`: starts on SQLite (data/engine.db) with no arguments.

`engine-server migrate [--database-url URL]` upgrades a database's schema to this version's.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from engine_server.server import serve
from engine_server.settings import parse_args
from storage.database import create_database_engines
from storage.migrate import current_revision, head_revision, upgrade


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] == "migrate" else "serve"
    settings = parse_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if command == "migrate":
        migrate(settings.database_url)
    else:
        asyncio.run(serve(settings))


def migrate(database_url: str) -> None:
    """`engine-server migrate`: upgrades the database schema to what this version needs."""
    engine = create_database_engines(database_url)[0]
    try:
        before = current_revision(engine)
        upgrade(engine)
        after = head_revision()
        print(f"schema: {before or 'empty'} -> {after}" if before != after else f"schema already at {after}")
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
