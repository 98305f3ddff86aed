"""Drives `decide` like the server would, with component behaviour given as plain functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine_server.core.decide import Decision, OfferTask, StartPipeline, TaskCompleted, TaskFailed, decide
from engine_server.core.model import NodeRun, NodeState, PipelineState, Snapshot
from engine_server.core.tree import check_variables, parse_tree

NOW = 1_700_000_000_000
# A component: (inputs) -> outputs, or raises to fail.
Behaviour = Callable[[dict[str, Any]], dict[str, Any]]


class Simulation:
    def __init__(
        self,
        tree: dict[str, Any],
        components: dict[str, Behaviour],
        *,
        inputs: dict[str, Any] | None = None,
        cycle_tolerate: bool = False,
        rerun_limit: int = 100,
    ) -> None:
        spec = parse_tree(tree, cycle_tolerate=cycle_tolerate)
        problems = check_variables(spec, inputs or {})
        assert not problems, problems
        presets = {f"${{{key}}}": value for key, value in (inputs or {}).items()}
        self.snapshot = Snapshot("p", spec, PipelineState.RUNNING, {}, {}, presets=presets, rerun_limit=rerun_limit)
        self.components = components
        self.histories: dict[str, list[NodeRun]] = {}
        self.offers: list[OfferTask] = []
        self.executed: list[tuple[str, dict[str, Any]]] = []  # (component code, inputs) in order

    def apply(self, decision: Decision) -> None:
        assert decision.rejection is None, decision.rejection
        for run in decision.histories:
            self.histories.setdefault(run.node_id, []).append(run)
        self.offers.extend(c for c in decision.commands if isinstance(c, OfferTask))
        self.snapshot = decision.snapshot

    def run(self, max_steps: int = 10_000) -> Simulation:
        self.apply(decide(self.snapshot, StartPipeline(), NOW))
        for _ in range(max_steps):
            if not self.offers:
                return self
            offer = self.offers.pop(0)
            run = self.snapshot.nodes[offer.node_id]
            if run.version != offer.version or run.state is not NodeState.RUNNING:
                continue
            inputs = dict(offer.inputs)
            self.executed.append((offer.component_code, inputs))
            try:
                outputs = self.components[offer.component_code](inputs)
            except Exception as exc:
                event: Any = TaskFailed(offer.node_id, offer.version, f"{type(exc).__name__}: {exc}")
            else:
                event = TaskCompleted(offer.node_id, offer.version, outputs)
            self.apply(decide(self.snapshot, event, NOW))
        raise AssertionError("the simulation did not settle")

    @property
    def state(self) -> PipelineState:
        return self.snapshot.state

    def node_state(self, node_id: str) -> NodeState | None:
        run = self.snapshot.nodes.get(node_id)
        return run.state if run is not None else None

    def outputs(self, node_id: str) -> dict[str, Any]:
        return dict(self.snapshot.nodes[node_id].outputs)
