"""Declaring components, and turning a component call into the result the worker reports.

Two forms:

* a function, decorated with ``@component("code")``: its parameters are bound by name from the
  task's inputs, and its return value is the node's outputs::

      @component("add")
      def add(a: int, b: int = 0) -> dict[str, int]:
          return {"sum": a + b}

* a `Component` subclass with ``execute`` and, for polling or callback components, ``schedule``::

      class WaitForJob(Component):
          code = "wait_for_job"

          def execute(self, inputs, ctx):
              return PollAgain(after_ms=1000, outputs={"job_id": submit(inputs)})

          def schedule(self, inputs, ctx):
              job = fetch(ctx.outputs["job_id"])
              return Done({"result": job.result}) if job.done else PollAgain(after_ms=1000)

Either form may be ``async def``. `invoke` / `invoke_async` run one task and never raise for a
component's own failure: exceptions become a `Failure` with ``"ExceptionClass: message"``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, ParamSpec, TypeAlias, TypeVar

from worker_sdk.context import TaskContext, TaskKind, activate, deactivate
from worker_sdk.errors import RetryableError

__all__ = [
    "AwaitCallback",
    "Component",
    "ComponentReturn",
    "Done",
    "Failure",
    "FunctionComponent",
    "Outcome",
    "PollAgain",
    "Result",
    "component",
    "format_exception",
    "invoke",
    "invoke_async",
]

_NO_OUTPUTS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Done:
    """The work is finished; `outputs` become the node's outputs."""

    outputs: Mapping[str, Any] = field(default_factory=lambda: _NO_OUTPUTS)


@dataclass(frozen=True)
class PollAgain:
    """Not finished: run `schedule` again after `after_ms`. `outputs` are kept for later runs."""

    after_ms: int
    outputs: Mapping[str, Any] = field(default_factory=lambda: _NO_OUTPUTS)

    def __post_init__(self) -> None:
        # The protocol reads 0 as "not polling", which would silently finish the node.
        if self.after_ms < 1:
            raise ValueError(f"PollAgain.after_ms must be at least 1, got {self.after_ms}")


@dataclass(frozen=True)
class AwaitCallback:
    """Not finished: wait for a client callback, whose data arrives in a schedule task."""

    outputs: Mapping[str, Any] = field(default_factory=lambda: _NO_OUTPUTS)


@dataclass(frozen=True)
class Failure:
    """The task failed. Produced by the SDK from an exception; components raise instead."""

    message: str
    retryable: bool = False
    retry_after_ms: int = 0
    exception: BaseException | None = field(default=None, compare=False, repr=False)
    """The exception behind the failure, kept for the worker's log (with its traceback)."""


Result: TypeAlias = Done | PollAgain | AwaitCallback
"""What a component may return to say how the work went."""

ComponentReturn: TypeAlias = Result | Mapping[str, Any] | None
"""Everything a component may return: a result, a dict of outputs, or None (no outputs)."""

Outcome: TypeAlias = Result | Failure
"""What the worker reports for a task."""


class Component:
    """Base class for class-form components.

    Set `code` (and `version`, default ``"legacy"``) as class attributes and implement `execute`;
    implement `schedule` for polling and callback components. Either may be ``async def``. The
    worker accepts the class (instantiated without arguments) or an instance.
    """

    code: str
    version: str = "legacy"

    def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> ComponentReturn | Awaitable[ComponentReturn]:
        raise NotImplementedError(f"component {self._label()} does not implement execute()")

    def schedule(self, inputs: dict[str, Any], ctx: TaskContext) -> ComponentReturn | Awaitable[ComponentReturn]:
        raise NotImplementedError(f"component {self._label()} was asked to schedule but does not implement schedule()")

    def handler(self, kind: TaskKind) -> Callable[[dict[str, Any], TaskContext], Any]:
        """The method that serves tasks of `kind`."""
        return self.schedule if kind is TaskKind.SCHEDULE else self.execute

    def is_async(self, kind: TaskKind) -> bool:
        """Whether the handler for `kind` must be awaited (and so runs on the worker's event loop)."""
        return inspect.iscoroutinefunction(self.handler(kind))

    def _label(self) -> str:
        return f"{getattr(self, 'code', '?')!r} ({type(self).__name__})"


P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class _Parameters:
    """How a function's parameters are filled from a task's inputs."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    takes_rest: bool  # has **kwargs

    @classmethod
    def of(cls, func: Callable[..., Any], code: str) -> _Parameters:
        required: list[str] = []
        optional: list[str] = []
        takes_rest = False
        for parameter in inspect.signature(func).parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                takes_rest = True
            elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                continue  # left empty: inputs have names, not positions
            elif parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
                if parameter.default is inspect.Parameter.empty:
                    raise TypeError(
                        f"component {code!r}: parameter {parameter.name!r} is positional-only, "
                        "but inputs are bound by name"
                    )
            elif parameter.default is inspect.Parameter.empty:
                required.append(parameter.name)
            else:
                optional.append(parameter.name)
        return cls(tuple(required), tuple(optional), takes_rest)

    def bind(self, inputs: Mapping[str, Any], code: str) -> dict[str, Any]:
        missing = [name for name in self.required if name not in inputs]
        if missing:
            names = ", ".join(repr(name) for name in missing)
            plural = "s" if len(missing) > 1 else ""
            raise TypeError(f"component {code!r} is missing required input{plural} {names}")
        if self.takes_rest:
            return dict(inputs)
        return {name: inputs[name] for name in (*self.required, *self.optional) if name in inputs}


class FunctionComponent(Component, Generic[P, R]):
    """A function made into a component by `@component`. Calling it calls the function unchanged."""

    __name__: str  # copied from the function, as functools.wraps does

    def __init__(self, func: Callable[P, R], code: str, version: str) -> None:
        self.code = code
        self.version = version
        self.func = func
        self._call_by_name: Callable[..., Any] = func
        self._parameters = _Parameters.of(func, code)
        self._is_async = inspect.iscoroutinefunction(func)
        functools.update_wrapper(self, func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        return self._call_by_name(**self._parameters.bind(inputs, self.code))

    # A function serves schedule tasks too: it can tell them apart by `current_task().kind`.
    schedule = execute

    def is_async(self, kind: TaskKind) -> bool:
        return self._is_async

    def __repr__(self) -> str:
        return f"<component {self.code!r} version {self.version!r}: {self.func.__qualname__}>"


def component(code: str, *, version: str = "legacy") -> Callable[[Callable[P, R]], FunctionComponent[P, R]]:
    """Declares a function as the component `code` (at `version`).

    Inputs bind to parameters by name; parameters with defaults are optional; a ``**kwargs``
    parameter receives all inputs. Inputs without a parameter are ignored. Return a dict of
    outputs, None (no outputs), or a `Done` / `PollAgain` / `AwaitCallback`.
    """
    if not code:
        raise ValueError("a component needs a non-empty code")

    def decorate(func: Callable[P, R]) -> FunctionComponent[P, R]:
        return FunctionComponent(func, code, version)

    return decorate


def format_exception(error: BaseException) -> str:
    """The failure message stored as the node's ex_data: ``"ValueError: bad input"``."""
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def to_outcome(value: object, code: str) -> Outcome:
    """Reads a component's return value."""
    if isinstance(value, (Done, PollAgain, AwaitCallback)):
        return value
    if value is None:
        return Done()
    if isinstance(value, Mapping):
        return Done(outputs=dict(value))
    return Failure(
        f"TypeError: component {code!r} returned {type(value).__name__}; expected a dict of outputs, "
        "None, Done, PollAgain or AwaitCallback"
    )


def _failure_from(error: Exception) -> Failure:
    if isinstance(error, RetryableError):
        # Raised on purpose to ask for a retry: its message says enough, no traceback needed.
        return Failure(error.message, retryable=True, retry_after_ms=error.retry_after_ms)
    return Failure(format_exception(error), exception=error)


def invoke(component: Component, ctx: TaskContext) -> Outcome:
    """Runs a synchronous component for one task, with `ctx` as the current task."""
    token = activate(ctx)
    try:
        value = component.handler(ctx.kind)(dict(ctx.inputs), ctx)
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited on purpose; closing avoids a RuntimeWarning
            raise TypeError(
                f"component {component.code!r} returned an awaitable from a plain function; declare it with `async def`"
            )
        return to_outcome(value, component.code)
    except Exception as error:
        return _failure_from(error)
    finally:
        deactivate(token)


async def invoke_async(component: Component, ctx: TaskContext) -> Outcome:
    """Runs an ``async def`` component for one task, with `ctx` as the current task.

    `asyncio.CancelledError` is not caught: the worker cancels a coroutine only when the task's
    result is to be dropped anyway.
    """
    token = activate(ctx)
    try:
        value = await component.handler(ctx.kind)(dict(ctx.inputs), ctx)
        return to_outcome(value, component.code)
    except Exception as error:
        return _failure_from(error)
    finally:
        deactivate(token)
