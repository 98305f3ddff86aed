"""Python SDK of the pipeline engine: workers, components, a client, and the pipeline builder.

from worker_sdk import Worker, component

@component("add")
def add(a: int, b: int) -> dict[str, int]:
    return {"sum": a + b}

Worker("localhost:50051", [add]).run()
"""

from worker_sdk.builder import (
    ConditionalParallelGateway,
    ConvergeGateway,
    Data,
    DataInput,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    ExecutableEndEvent,
    NodeOutput,
    ParallelGateway,
    Params,
    RewritableNodeOutput,
    ServiceActivity,
    SubProcess,
    Var,
    build_tree,
)
from worker_sdk.client import FINAL_STATES, EngineClient, PipelineStart, StartResult, WaitTimeout
from worker_sdk.component import AwaitCallback, Component, Done, PollAgain, Result, component
from worker_sdk.context import TaskContext, TaskKind, current_task
from worker_sdk.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EngineError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryableError,
    TaskCancelled,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    is_transient,
)
from worker_sdk.worker import Worker

__all__ = [
    "FINAL_STATES",
    "AlreadyExists",
    "AwaitCallback",
    "Component",
    "ConditionalParallelGateway",
    "ConvergeGateway",
    "Data",
    "DataInput",
    "DeadlineExceeded",
    "Done",
    "EmptyEndEvent",
    "EmptyStartEvent",
    "EngineClient",
    "EngineError",
    "ExclusiveGateway",
    "ExecutableEndEvent",
    "FailedPrecondition",
    "InvalidArgument",
    "NodeOutput",
    "NotFound",
    "ParallelGateway",
    "Params",
    "PermissionDenied",
    "PipelineStart",
    "PollAgain",
    "ResourceExhausted",
    "Result",
    "RetryableError",
    "RewritableNodeOutput",
    "ServiceActivity",
    "StartResult",
    "SubProcess",
    "TaskCancelled",
    "TaskContext",
    "TaskKind",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Var",
    "WaitTimeout",
    "Worker",
    "build_tree",
    "component",
    "current_task",
    "is_transient",
]
