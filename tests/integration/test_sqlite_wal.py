"""SQLite's write-ahead log stays bounded while pipelines run without a pause (a real server and worker)."""

from __future__ import annotations

from pathlib import Path

from tests.support.processes import ServerProcess, WorkerProcess
from tests.trees import chain_tree
from worker_sdk import EngineClient

MIB = 1024 * 1024


def test_the_wal_starts_over_under_continuous_writes_instead_of_growing(tmp_path: Path) -> None:
    database = tmp_path / "engine.db"
    server = ServerProcess(f"sqlite:///{database}", log_dir=tmp_path)
    server.start()
    worker = WorkerProcess(server.address, ["echo"], concurrency=2, log_dir=tmp_path)
    try:
        worker.start()
        with EngineClient(server.address) as client:
            # 600 hops one after another, each its own commit of ~45 KB of WAL pages: 27 MB in all, written
            # without a pause long enough for the background checkpoint alone to let the WAL start over.
            pipeline_id = client.start(chain_tree(["echo"] * 600))
            assert client.wait(pipeline_id, timeout=120)["state"] == "FINISHED"
        # The WAL file is never shrunk while the server runs: its size is the furthest it ever reached.
        wal_size = (tmp_path / "engine.db-wal").stat().st_size
        assert wal_size < 8 * MIB, f"the WAL grew to {wal_size / MIB:.1f} MB"
    finally:
        worker.stop()
        server.stop()
