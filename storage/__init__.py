"""Persistence: SQLAlchemy Core schema and statements for SQLite (embedded default) and PostgreSQL."""
