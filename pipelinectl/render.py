"""Drawing state trees, pipeline lists and state changes with rich; plain data in, renderables out."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

STATE_STYLES: dict[str, str] = {
    "READY": "cyan",
    "RUNNING": "yellow",
    "SUSPENDED": "magenta",
    "FINISHED": "green",
    "FAILED": "bold red",
    "REVOKED": "bright_black",
}
# Wide enough for the longest state name, so node ids line up at each depth.
_STATE_WIDTH = max(len(name) for name in STATE_STYLES)


def state_text(state: str | None, *, pad: bool = False) -> Text:
    name = state or "-"
    return Text(name.ljust(_STATE_WIDTH) if pad else name, style=STATE_STYLES.get(name, "dim"))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def format_time(moment: datetime | None) -> str:
    """Local time, to the second: what an operator compares with their own clock and logs."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment is not None else ""


def _counters(node: Mapping[str, Any]) -> list[str]:
    counters = []
    if node.get("retry"):
        counters.append(f"retry {node['retry']}")
    if (node.get("loop") or 0) > 1:
        counters.append(f"loop {node['loop']}")
    if (node.get("inner_loop") or 0) > 1 and node.get("inner_loop") != node.get("loop"):
        counters.append(f"inner loop {node['inner_loop']}")
    if node.get("schedule_times"):
        counters.append(f"scheduled {node['schedule_times']}x")
    if node.get("skip"):
        counters.append("skipped")
    if node.get("error_ignored"):
        counters.append("error ignored")
    return counters


def _node_label(node_id: str, node: Mapping[str, Any]) -> Text:
    label = Text.assemble(state_text(node.get("state"), pad=True), "  ", (node_id, "bold"))
    name = node.get("name")
    if name and name != node_id:
        label.append(f' "{name}"')
    label.append(f"  {node.get('type') or ''}", style="dim")
    duration = format_duration(node.get("elapsed_time"))
    if duration:
        label.append(f"  {duration}")
    counters = _counters(node)
    if counters:
        label.append(f"  {', '.join(counters)}", style="cyan")
    return label


def _root_label(state: Mapping[str, Any]) -> Text:
    label = Text.assemble("pipeline ", (str(state.get("id")), "bold"))
    name = state.get("name")
    if name:
        label.append(f' "{name}"')
    label.append("  ")
    label.append_text(state_text(state.get("state")))
    duration = format_duration(state.get("elapsed_time"))
    if duration:
        label.append(f"  {duration}")
    started = format_time(state.get("start_time"))
    if started:
        label.append(f"  started {started}", style="dim")
    return label


def _add_children(branch: Tree, children: Mapping[str, Any], errors: Mapping[str, str]) -> None:
    # Reach order, as the engine lists them, except that nodes appointed for pause but not reached yet
    # (no start time) come after the reached ones rather than before.
    reached_first = sorted(children.items(), key=lambda item: item[1].get("start_time") is None)
    for node_id, node in reached_first:
        child = branch.add(_node_label(node_id, node))
        error = errors.get(node_id)
        if error:
            child.add(Text(error, style="red"))
        _add_children(child, node.get("children") or {}, errors)


def state_tree(state: Mapping[str, Any], errors: Mapping[str, str] | None = None) -> RenderableType:
    """The pipeline and its nodes in reach order, subprocesses nested, failure messages under their nodes.

    `errors` maps node ids to their `ex_data`. Pipeline outputs and the failure handler follow the tree.
    """
    tree = Tree(_root_label(state), guide_style="dim")
    _add_children(tree, state.get("children") or {}, errors or {})
    parts: list[RenderableType] = [tree]
    outputs = state.get("outputs")
    if outputs:
        parts.append(Text.assemble(("outputs ", "bold"), json.dumps(outputs, ensure_ascii=False, default=str)))
    handler = state.get("failure_handler")
    if handler:
        parts.append(
            Text.assemble(
                ("failure handler ", "bold"), f"{handler.get('code')} ", state_text(handler.get("state") or None)
            )
        )
    return Group(*parts)


def iter_nodes(children: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every node of a state tree, depth first in reach order, subprocess nodes before their own nodes."""
    for node_id, node in children.items():
        yield node_id, node
        yield from iter_nodes(node.get("children") or {})


def pipeline_table(pipelines: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "STATE", "NAME", "CREATED", "FINISHED"):
        table.add_column(column, no_wrap=column != "NAME")
    for pipeline in pipelines:
        table.add_row(
            str(pipeline["id"]),
            state_text(pipeline.get("state")),
            pipeline.get("name") or "",
            format_time(pipeline.get("create_time")),
            format_time(pipeline.get("finish_time")),
        )
    return table


def change_line(change: Mapping[str, Any]) -> Text:
    """One state change as a log line: ``21:03:05  a1  RUNNING -> FINISHED``."""
    moment = change.get("time")
    clock = moment.astimezone().strftime("%H:%M:%S") if moment is not None else "--:--:--"
    return Text.assemble(
        (clock, "dim"),
        "  ",
        (change.get("node_id") or "pipeline", "bold"),
        "  ",
        state_text(change.get("old_state")),
        " -> ",
        state_text(change.get("new_state")),
    )
