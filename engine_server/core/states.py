"""Node and pipeline state machines, as data."""

from __future__ import annotations

from engine_server.core.model import NodeState, PipelineState

# None stands for "no state yet" (the node has not been reached).
NODE_TRANSITIONS: dict[NodeState | None, frozenset[NodeState]] = {
    None: frozenset({NodeState.READY, NodeState.RUNNING, NodeState.SUSPENDED, NodeState.FINISHED, NodeState.FAILED}),
    NodeState.READY: frozenset({NodeState.RUNNING, NodeState.SUSPENDED, NodeState.REVOKED}),
    NodeState.RUNNING: frozenset(
        {NodeState.RUNNING, NodeState.FINISHED, NodeState.FAILED, NodeState.SUSPENDED, NodeState.REVOKED}
    ),
    NodeState.SUSPENDED: frozenset({NodeState.READY, NodeState.RUNNING, NodeState.REVOKED}),
    # A failed node can be retried (RUNNING), skipped or error-ignored (FINISHED), or revoked.
    NodeState.FAILED: frozenset({NodeState.RUNNING, NodeState.FINISHED, NodeState.REVOKED}),
    # A finished node runs again only when a loop re-enters it.
    NodeState.FINISHED: frozenset({NodeState.RUNNING, NodeState.READY}),
    NodeState.REVOKED: frozenset(),
}

PIPELINE_TRANSITIONS: dict[PipelineState, frozenset[PipelineState]] = {
    PipelineState.RUNNING: frozenset(
        {PipelineState.SUSPENDED, PipelineState.FINISHED, PipelineState.FAILED, PipelineState.REVOKED}
    ),
    PipelineState.SUSPENDED: frozenset({PipelineState.RUNNING, PipelineState.REVOKED}),
    PipelineState.FAILED: frozenset({PipelineState.RUNNING, PipelineState.REVOKED}),
    PipelineState.FINISHED: frozenset(),
    PipelineState.REVOKED: frozenset(),
}

# Nodes in these states may still move the pipeline forward by themselves.
ACTIVE_NODE_STATES = frozenset({NodeState.RUNNING, NodeState.READY})


def can_transition(old: NodeState | None, new: NodeState) -> bool:
    return new in NODE_TRANSITIONS[old]


def can_transition_pipeline(old: PipelineState, new: PipelineState) -> bool:
    return new in PIPELINE_TRANSITIONS[old]
