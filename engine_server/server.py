"""Assembles the gRPC server around the engine and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine_api.engine.v1 import engine_pb2, engine_pb2_grpc, worker_pb2, worker_pb2_grpc
from engine_server.engine import Engine
from engine_server.metrics import EngineMetrics, MetricsServer
from engine_server.servicers import EngineServicer, WorkerServicer, max_message_bytes
from engine_server.settings import Settings
from storage.database import DatabaseInUse, SqliteLock
from storage.migrate import SchemaMismatch
from storage.notifier import LocalNotifier, RedisNotifier
from storage.store import Store

log = logging.getLogger("engine_server")

# Seconds in-flight RPCs get to finish on shutdown.
SHUTDOWN_GRACE_S = 5.0


class EngineServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sqlite_lock = SqliteLock(settings.database_url)
        self.store = Store(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        notifier = RedisNotifier(settings.redis_url) if settings.redis_url else LocalNotifier()
        self.metrics = EngineMetrics()
        self.metrics.count_pipelines_from(self.store)
        self.metrics_server: MetricsServer | None = None
        self.engine = Engine(self.store, settings, notifier=notifier, metrics=self.metrics)
        # Room for the largest tree plus framing; payload fields are checked against their own limit.
        max_message = max_message_bytes(settings)
        self.grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                ("grpc.so_reuseport", 0),
                # Task streams are long-lived and often idle: ping them, and accept workers' keepalive pings,
                # so a connection a load balancer or NAT dropped is noticed (and its tasks re-offered).
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        )
        engine_pb2_grpc.add_EngineServiceServicer_to_server(EngineServicer(self.engine, settings), self.grpc_server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(self.engine, settings), self.grpc_server)
        # Standard health checking (SERVING once the engine runs) and reflection, so grpcurl works.
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        services = [
            engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name,
            worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(services, self.grpc_server)
        self.port = 0

    async def start(self) -> None:
        # Bind first: a busy port should stop the server before it touches the database.
        try:
            self.port = self.grpc_server.add_insecure_port(self.settings.listen)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise SystemExit(
                f"engine-server: cannot listen on {self.settings.listen}: the address is in use or invalid "
                "(is another engine server running? choose another with --listen or ENGINE_LISTEN)"
            )
        if self.settings.metrics_port:
            try:
                self.metrics_server = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            except OSError as exc:
                raise SystemExit(
                    f"engine-server: cannot serve metrics on {self.settings.metrics_host}:{self.settings.metrics_port}"
                    f" ({exc.strerror or exc}); choose another with --metrics-port or ENGINE_METRICS_PORT"
                ) from None
        try:
            self.sqlite_lock.acquire()
            await self.engine.start()
        except (SchemaMismatch, DatabaseInUse) as exc:
            raise SystemExit(f"engine-server: {exc}") from None
        for service in ("", "engine.v1.EngineService", "engine.v1.WorkerService"):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await self.grpc_server.start()
        log.info(
            "engine server listening on %s (database %s)",
            self.settings.listen.rsplit(":", 1)[0] + f":{self.port}",
            self.store.writer.url.render_as_string(hide_password=True),
        )
        if self.metrics_server is not None:
            log.info("metrics at http://%s:%d/metrics", self.settings.metrics_host, self.metrics_server.port)

    async def stop(self) -> None:
        log.info("shutting down: finishing in-flight requests")
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.create_task(self.grpc_server.stop(SHUTDOWN_GRACE_S))
        await self.engine.stop()
        await stopping
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)  # waits up to half a second for its thread
        self.sqlite_lock.release()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    server = EngineServer(settings)
    await server.start()
    # Everything loaded at start-up (modules, compiled statements) lives as long as the server: keep it out of
    # the collector's scans, and collect the young generation less often. Batches allocate many short-lived
    # objects, and with the default threshold (700) the collector ran dozens of times per batch.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
