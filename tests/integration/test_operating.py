"""What an operator's tools see: gRPC health checking and server reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.processes import ServerProcess

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_health_check_answers_serving(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "engine.v1.EngineService", "engine.v1.WorkerService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {service.name for service in reply.list_services_response.service}
        assert {"engine.v1.EngineService", "engine.v1.WorkerService", "grpc.health.v1.Health"} <= names
        describe = reflection_pb2.ServerReflectionRequest(file_containing_symbol="engine.v1.WorkerService")
        [reply] = list(stub.ServerReflectionInfo(iter([describe]), timeout=5))
        assert reply.file_descriptor_response.file_descriptor_proto  # enough for grpcurl to call it
