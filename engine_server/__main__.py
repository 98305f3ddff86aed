"""`engine-server` / `python -m engine_server`: starts on SQLite (data/engine.db) with no arguments.

`engine-server migrate [--database-url URL]` upgrades a database's schema to this version's.
`engine-server purge --older-than 30d [--database-url URL]` deletes pipelines that ended longer ago.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence

from engine_server.logs import configure_logging
from engine_server.server import serve
from engine_server.settings import SUBCOMMANDS_HELP, parse_args
from storage.database import create_database_engines
from storage.migrate import current_revision, head_revision, upgrade
from storage.store import Store


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in ("migrate", "purge") else "serve"
    if command != "serve" and ("-h" in args or "--help" in args):
        print(SUBCOMMANDS_HELP, end="")
        return
    older_than = ""
    if command == "purge":
        if "--older-than" not in args or args.index("--older-than") + 1 >= len(args):
            raise SystemExit("usage: engine-server purge --older-than AGE (e.g. 30d, 12h, 90m) [--database-url URL]")
        at = args.index("--older-than")
        older_than = args[at + 1]
        del args[at : at + 2]
    settings = parse_args(args)
    configure_logging(settings.log_format, settings.log_level)
    if command == "migrate":
        migrate(settings.database_url)
    elif command == "purge":
        purge(settings.database_url, older_than)
    else:
        asyncio.run(serve(settings))


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> int:
    """'30d', '12h', '90m', '45s' -> milliseconds."""
    number, unit = text[:-1], text[-1:]
    if unit not in AGE_UNITS or not number.isdigit():
        raise SystemExit(
            f"engine-server purge: --older-than {text!r}: write a whole number and s, m, h or d (e.g. 30d)"
        )
    return int(number) * AGE_UNITS[unit] * 1000


def purge(database_url: str, older_than: str) -> None:
    """`engine-server purge --older-than 30d`: deletes pipelines that ended longer ago, in batches."""
    finished_before = time.time_ns() // 1_000_000 - parse_age(older_than)
    store = Store(database_url)
    try:
        print(f"purged {store.purge_finished(finished_before)} pipelines that ended more than {older_than} ago")
    finally:
        store.dispose()


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
