"""The engine server: gRPC servicers around the batching engine, on SQLite or PostgreSQL."""
