"""Schema migrations (Alembic) and the start-up check that the database matches the code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class SchemaMismatch(Exception):
    """The database's schema is not the one this code needs; the message says what to run."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "storage/migrations has no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as connection:
        command.upgrade(_config(connection), revision)


def revision_history() -> list[str]:
    """Every revision id, oldest first."""
    script = ScriptDirectory.from_config(_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def prepare(engine: Engine) -> str:
    """Creates the schema in an empty database; refuses one at another revision. Returns what it did."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return f"schema at revision {head}"
    if current is None:
        if inspect(engine).has_table("pipelines"):
            raise SchemaMismatch(
                "the database has engine tables but no migration record; it was not created by this engine's "
                "migrations. Use an empty database or restore the alembic_version table."
            )
        upgrade(engine)
        return f"created the schema (revision {head})"
    known = revision_history()
    if current in known:
        raise SchemaMismatch(
            f"the database schema is at revision {current}, this server needs {head}: "
            "run `engine-server migrate` (with the same --database-url) first"
        )
    raise SchemaMismatch(
        f"the database schema is at revision {current}, which this server does not know (it needs {head}): "
        "it was migrated by a newer engine version; run that version, or a newer one"
    )
