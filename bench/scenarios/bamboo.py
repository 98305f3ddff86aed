"""`bamboo-17`: 100 pipelines of bamboo-engine's benchmark shape, started together.

The shape of bamboo-engine's published benchmark (and of the bamboo-engine peer runner):

    start -> a1 -> a2 -> subprocess(start -> s1 -> s2 -> end) -> parallel(b1, b2, b3) -> converge
          -> exclusive(c1 | c2: the condition picks c1) -> converge -> end

17 nodes plus the subprocess's start and end; 8 activities run per pipeline (c2 is not taken).
Every activity renders two splice inputs from the pipeline's variables, which the subprocess
receives through `Params`, as in bamboo's benchmark, so variable rendering is part of the work.
"""

from __future__ import annotations

from typing import Any

from bench.scenarios.base import RunResult, Scenario, ScenarioContext
from bench.scenarios.together import run_together
from bench.worker import NOOP
from worker_sdk import (
    ConvergeGateway,
    Data,
    DataInput,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    ParallelGateway,
    Params,
    ServiceActivity,
    SubProcess,
    Var,
    build_tree,
)

PIPELINES = 100
ACTIVITIES_RUN = 8  # a1, a2, s1, s2, b1-b3, and the one exclusive branch taken


def _activity() -> ServiceActivity:
    activity = ServiceActivity(component_code=NOOP)
    activity.component.inputs.param_1 = Var(type=Var.SPLICE, value="${constant_1}")
    activity.component.inputs.param_2 = Var(type=Var.SPLICE, value="${constant_2}")
    return activity


def bamboo_shape() -> dict[str, Any]:
    """One tree of the shape, with fresh ids (a bamboo user builds a tree per run)."""
    sub_start = EmptyStartEvent()
    sub_start.extend(_activity()).extend(_activity()).extend(EmptyEndEvent())
    sub_data = Data()
    sub_data.inputs["${constant_1}"] = DataInput(type=Var.PLAIN, value="default_value")
    sub_data.inputs["${constant_2}"] = DataInput(type=Var.PLAIN, value="default_value")
    subprocess = SubProcess(
        start=sub_start,
        data=sub_data,
        params=Params(
            {
                "${constant_1}": Var(type=Var.SPLICE, value="${constant_1}"),
                "${constant_2}": Var(type=Var.SPLICE, value="${constant_2}"),
            }
        ),
    )
    choose = ExclusiveGateway(conditions={0: '${constant_1} == "value_1"', 1: '${constant_1} != "value_1"'})

    start = EmptyStartEvent()
    (
        start.extend(_activity())
        .extend(_activity())
        .extend(subprocess)
        .extend(ParallelGateway())
        .connect(_activity(), _activity(), _activity())
        .converge(ConvergeGateway())
        .extend(choose)
        .connect(_activity(), _activity())
        .to(choose)
        .converge(ConvergeGateway())
        .extend(EmptyEndEvent())
    )
    data = Data()
    data.inputs["${constant_1}"] = Var(type=Var.PLAIN, value="value_1")
    data.inputs["${constant_2}"] = Var(type=Var.PLAIN, value="value_2")
    return build_tree(start, data=data)


def run_bamboo(context: ScenarioContext) -> RunResult:
    trees = [bamboo_shape() for _ in range(context.scaled(PIPELINES))]
    return run_together(context, trees, tasks_per_pipeline=ACTIVITIES_RUN)


BAMBOO_17 = Scenario(
    name="bamboo-17",
    description=f"{PIPELINES} pipelines of bamboo-engine's benchmark shape (subprocess, parallel and exclusive "
    f"gateways; {ACTIVITIES_RUN} activities run each), started together",
    headline_latency="per_node",
    run=run_bamboo,
)
