"""The `pipelinectl` commands: click for the command line, `EngineClient` for the engine, rich for the output."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import IntEnum
from typing import IO, Any, NoReturn

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from pipelinectl.render import change_line, iter_nodes, pipeline_table, state_tree
from worker_sdk.client import FINAL_STATES, EngineClient, WaitTimeout
from worker_sdk.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    is_transient,
)

PIPELINE_STATES = ("RUNNING", "SUSPENDED", "FINISHED", "FAILED", "REVOKED")
# `start --wait` without --timeout waits in rounds this long (a call deadline must be finite).
_WAIT_ROUND_SECONDS = 3600.0


class ExitCode(IntEnum):
    OK = 0
    REFUSED = 1  # the engine refused the operation, the tree has problems, or the pipeline did not finish
    USAGE = 2  # bad options, unreadable file, malformed JSON (click uses 2 for its own usage errors too)
    NOT_FOUND = 3
    UNREACHABLE = 4
    TIMED_OUT = 5
    INTERRUPTED = 130


EXIT_CODES_HELP = """\b
Exit codes:
  0  done; for start --wait and watch: the pipeline FINISHED
  1  the engine refused the operation (FAILED_PRECONDITION, INVALID_ARGUMENT, ...),
     validate found problems, or the pipeline ended FAILED or REVOKED
  2  usage error: bad option, unreadable FILE, malformed JSON
  3  not found: no such pipeline or node
  4  the engine is unreachable (or did not answer in time)
  5  start --wait --timeout ran out while the pipeline was still going
  130  interrupted (Ctrl-C)
"""


# --- errors ----------------------------------------------------------------------------------------


class _Refused(click.ClickException):
    exit_code = ExitCode.REFUSED


class _NotFound(click.ClickException):
    exit_code = ExitCode.NOT_FOUND


class _Unreachable(click.ClickException):
    exit_code = ExitCode.UNREACHABLE


def engine_failure(error: EngineError, target: str) -> click.ClickException:
    """An `EngineError` shown as the server's message on stderr, with the exit code of its kind."""
    if isinstance(error, (Unavailable, DeadlineExceeded)):
        return _Unreachable(f"cannot reach the engine at {target}: {error}")
    if isinstance(error, NotFound):
        return _NotFound(str(error))
    return _Refused(str(error))


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EngineError as error:
            raise engine_failure(error, ctx.params.get("target") or "?") from None
        except KeyboardInterrupt:
            # Ctrl-C is how an operator leaves `watch` or `start --wait`: no traceback, no "Aborted!".
            raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None


# --- parameters ------------------------------------------------------------------------------------


def _parse_json(value: str | None, param: click.Parameter, *, object_only: bool) -> Any:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as error:
        raise click.BadParameter(f"not valid JSON ({error}): {value!r}", param=param) from None
    if object_only and not isinstance(parsed, dict):
        raise click.BadParameter(
            f'must be a JSON object such as \'{{"name": "Ada"}}\', got {type(parsed).__name__}', param=param
        )
    return parsed


def json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    parsed: dict[str, Any] | None = _parse_json(value, param, object_only=True)
    return parsed


def json_value(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    return _parse_json(value, param, object_only=False)


TREE_FILE = click.File("r", encoding="utf-8")

inputs_option = click.option(
    "--inputs",
    metavar="JSON",
    callback=json_object,
    help='Pipeline inputs, a JSON object: \'{"name": "Ada"}\' (a key may also be written "${name}").',
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text.")
cycle_option = click.option(
    "--cycle-tolerate", is_flag=True, help="Allow cycles (loops through an exclusive gateway) in the tree."
)


def read_tree(file: IO[str]) -> str:
    """The tree's JSON text; a file that is not a JSON object is a usage error here, not a server round trip."""
    text = file.read()
    try:
        tree = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"{file.name} is not valid JSON ({error})", param_hint="FILE") from None
    if not isinstance(tree, dict):
        raise click.BadParameter(
            f"{file.name} must hold a pipeline tree (a JSON object), got {type(tree).__name__}", param_hint="FILE"
        )
    return text


# --- output ----------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, default=_json_default, ensure_ascii=False, indent=2))


# Piped output is read by grep and by people in wide log viewers: wrap far later than rich's default 80.
_PIPE_WIDTH = 160


def stdout_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=_PIPE_WIDTH)
    return console


def failure_messages(client: EngineClient, state: Mapping[str, Any]) -> dict[str, str]:
    """`ex_data` of failed and error-ignored nodes, which the state tree does not carry."""
    messages = {}
    for node_id, node in iter_nodes(state.get("children") or {}):
        if node.get("state") == "FAILED" or node.get("error_ignored"):
            try:
                ex_data = client.get_node_data(str(state["id"]), node_id).get("ex_data")
            except NotFound:
                continue  # gone between the two reads (a retry started); the next draw shows it
            if ex_data:
                messages[node_id] = str(ex_data)
    return messages


def state_json(state: Mapping[str, Any], errors: Mapping[str, str]) -> dict[str, Any]:
    """The state tree with each failed node's `ex_data` added, as `state --json` prints it."""

    def with_errors(children: Mapping[str, Any]) -> dict[str, Any]:
        result = {}
        for node_id, node in children.items():
            copy = dict(node, children=with_errors(node.get("children") or {}))
            if node_id in errors:
                copy["ex_data"] = errors[node_id]
            result[node_id] = copy
        return result

    return dict(state, children=with_errors(state.get("children") or {}))


def exit_code_for(pipeline_state: str | None) -> ExitCode:
    return ExitCode.OK if pipeline_state == "FINISHED" else ExitCode.REFUSED


def finish(code: ExitCode) -> NoReturn:
    raise click.exceptions.Exit(int(code))


# --- commands --------------------------------------------------------------------------------------


@click.group(cls=_Commands, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--target",
    envvar="ENGINE_TARGET",
    default="127.0.0.1:50051",
    show_default=True,
    show_envvar=True,
    metavar="HOST:PORT",
    help="The engine server's address.",
)
@click.pass_context
def cli(ctx: click.Context, target: str) -> None:
    """Operate pipelines on an engine server: start, inspect, watch and control them."""
    ctx.obj = target


def connect(ctx: click.Context) -> EngineClient:
    """A client for the command's target, closed when the command ends."""
    target = ctx.find_root().obj
    client = EngineClient(target)
    ctx.call_on_close(client.close)
    return client


@cli.command()
@click.argument("file", type=TREE_FILE)
@inputs_option
@click.option("--id", "pipeline_id", default=None, help="Choose the pipeline's id (default: the engine picks one).")
@click.option("--idempotency-key", default=None, help="A second start with the same key returns the first id.")
@cycle_option
@click.option("--wait", is_flag=True, help="Wait until the pipeline ends and show its final state tree.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="With --wait: give up after SECONDS.")
@json_option
@click.pass_context
def start(
    ctx: click.Context,
    file: IO[str],
    inputs: dict[str, Any] | None,
    pipeline_id: str | None,
    idempotency_key: str | None,
    cycle_tolerate: bool,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Start a pipeline from a tree file; prints its id.

    FILE is a bamboo pipeline tree (JSON; '-' reads stdin). With --wait, draws the final state tree and
    exits 0 only if the pipeline FINISHED.
    """
    tree_text = read_tree(file)
    client = connect(ctx)
    started_id = client.start(
        tree_text,
        inputs,
        pipeline_id=pipeline_id,
        idempotency_key=idempotency_key,
        cycle_tolerate=cycle_tolerate,
    )
    if not wait:
        if as_json:
            print_json({"id": started_id})
        else:
            click.echo(started_id)
        return
    if not as_json:
        click.echo(started_id)  # at once, so the operator can watch or revoke it while this waits
    while True:
        try:
            final = client.wait(
                started_id, timeout=timeout if timeout is not None else _WAIT_ROUND_SECONDS, poll_interval=0.2
            )
            break
        except WaitTimeout as timed_out:
            if timeout is None:
                continue
            if timed_out.state is not None:
                show_state(client, timed_out.state, as_json)
            click.echo(f"Error: {timed_out}", err=True)
            finish(ExitCode.TIMED_OUT)
    show_state(client, final, as_json)
    finish(exit_code_for(final["state"]))


def show_state(client: EngineClient, state: dict[str, Any], as_json: bool) -> None:
    errors = failure_messages(client, state)
    if as_json:
        print_json(state_json(state, errors))
    else:
        stdout_console().print(state_tree(state, errors))


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@json_option
@click.pass_context
def state(ctx: click.Context, pipeline_id: str, as_json: bool) -> None:
    """Show a pipeline's state tree.

    Nodes in the order they were reached, subprocesses nested, coloured by state, with retry/loop
    counters, durations and the messages of failed nodes.
    """
    client = connect(ctx)
    show_state(client, client.get_state(pipeline_id), as_json)


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@json_option
@click.pass_context
def watch(ctx: click.Context, pipeline_id: str, as_json: bool) -> None:
    """Follow a pipeline live until it ends.

    Ends when the pipeline FINISHES (exit 0), FAILS or is REVOKED (exit 1). In a terminal the state
    tree redraws as nodes change; otherwise (or with --json, one object per line) each state change is
    printed as it happens, then the final tree.
    """
    client = connect(ctx)
    state = client.get_state(pipeline_id)  # an unknown id or an unreachable engine ends here
    console = stdout_console()
    if console.is_terminal and not as_json:
        final = _watch_live(client, pipeline_id, state, console)
    else:
        final = _watch_lines(client, pipeline_id, console, as_json)
    finish(exit_code_for(final))


_STREAM_END = object()
# Errors that a new Watch stream would only repeat; any other (a server stopping mid-stream, UNAVAILABLE
# while it restarts) is followed by a reconnect.
_FINAL_STREAM_ERRORS = (NotFound, InvalidArgument, PermissionDenied, Unauthenticated, Unimplemented)


class _ChangeFeed:
    """The pipeline's Watch stream, read on a daemon thread (it blocks in gRPC) and handed over by a queue.

    Items: state change dicts, `EngineError`s (the feed reconnects after all but `_FINAL_STREAM_ERRORS`),
    and `_STREAM_END` once the server ends the stream at a final state.
    """

    def __init__(self, client: EngineClient, pipeline_id: str) -> None:
        self._client = client
        self._pipeline_id = pipeline_id
        self._items: queue.Queue[object] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"watch {pipeline_id}", daemon=True)

    def __enter__(self) -> _ChangeFeed:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Set before the client's channel closes, so the stream's cancellation reads as a stop, not an error.
        self._stopped.set()

    def get(self, timeout: float | None) -> object | None:
        """The next item, or None after `timeout` seconds without one."""
        try:
            return self._items.get(timeout=timeout)
        except queue.Empty:
            return None

    def _follow(self) -> None:
        while not self._stopped.is_set():
            try:
                for change in self._client.watch(self._pipeline_id):
                    if self._stopped.is_set():
                        return
                    self._items.put(change)
            except EngineError as error:
                if self._stopped.is_set():
                    return
                self._items.put(error)
                if isinstance(error, _FINAL_STREAM_ERRORS):
                    return
                self._stopped.wait(1.0)
            else:
                self._items.put(_STREAM_END)
                return


def _watch_live(client: EngineClient, pipeline_id: str, state: dict[str, Any], console: Console) -> str | None:
    def view(state: dict[str, Any], note: str = "") -> RenderableType:
        ended = state["state"] in FINAL_STATES
        header = Text(
            f"watched {pipeline_id} on {client.target} until it ended"
            if ended
            else f"watching {pipeline_id} on {client.target}   Ctrl-C to stop",
            style="dim",
        )
        parts: list[RenderableType] = [header, state_tree(state, failure_messages(client, state))]
        if note:
            parts.append(Text(note, style="yellow"))
        return Group(*parts)

    with Live(view(state), console=console, auto_refresh=False) as live, _ChangeFeed(client, pipeline_id) as feed:
        while state["state"] not in FINAL_STATES:
            # Every change redraws at once; a tick each second (and after the stream ended) redraws durations.
            item = feed.get(timeout=1.0)
            if isinstance(item, _FINAL_STREAM_ERRORS):
                raise item
            try:
                state = client.get_state(pipeline_id)
            except EngineError as error:
                if not is_transient(error):
                    raise
                live.update(view(state, f"engine unreachable, retrying: {error}"), refresh=True)
                continue
            live.update(view(state), refresh=True)
    return str(state["state"])


def _watch_lines(client: EngineClient, pipeline_id: str, console: Console, as_json: bool) -> str | None:
    """Prints each change as a line (the stream opens with the current state); stops at a final pipeline state."""
    emit: Callable[[dict[str, Any]], None] = (
        (lambda change: click.echo(json.dumps(change, default=_json_default, ensure_ascii=False)))
        if as_json
        else (lambda change: console.print(change_line(change)))
    )
    reconnecting = False
    with _ChangeFeed(client, pipeline_id) as feed:
        while (item := feed.get(timeout=1.0)) is not _STREAM_END:
            if item is None:  # waking up now and then keeps Ctrl-C prompt
                continue
            if isinstance(item, _FINAL_STREAM_ERRORS):
                raise item
            if isinstance(item, EngineError):
                if not reconnecting:  # once per outage; the new stream repeats the current state
                    click.echo(f"watch stream broken, reconnecting: {item}", err=True)
                reconnecting = True
                continue
            assert isinstance(item, dict)
            reconnecting = False
            emit(item)
            if item["node_id"] is None and item["new_state"] in FINAL_STATES:
                break
    final = client.get_state(pipeline_id)
    if not as_json:
        console.print(state_tree(final, failure_messages(client, final)))
    return str(final["state"])


@cli.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(PIPELINE_STATES, case_sensitive=False),
    help="Only pipelines in this state (repeat for several).",
)
@json_option
@click.pass_context
def list_(ctx: click.Context, states: tuple[str, ...], as_json: bool) -> None:
    """List pipelines, oldest first."""
    pipelines = connect(ctx).list_pipelines(states=[state.upper() for state in states])
    if as_json:
        print_json(pipelines)
    elif not pipelines:
        click.echo("no pipelines" + (f" in state {', '.join(s.upper() for s in states)}" if states else ""))
    else:
        stdout_console().print(pipeline_table(pipelines))


def report(changed: bool, what: str, as_json: bool) -> None:
    """A control operation's outcome; repeating one whose effect already holds is not an error."""
    if as_json:
        print_json({"changed": changed})
    else:
        click.echo(f"{what}: done" if changed else f"{what}: nothing to change (already so)")


def _one_target(node: str | None, subprocess: str | None) -> None:
    if node and subprocess:
        raise click.UsageError("give --node or --subprocess, not both")


node_target_option = click.option("--node", default=None, metavar="NODE", help="A node not reached yet.")
subprocess_option = click.option("--subprocess", default=None, metavar="NODE", help="Only this subprocess.")


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@node_target_option
@subprocess_option
@json_option
@click.pass_context
def pause(ctx: click.Context, pipeline_id: str, node: str | None, subprocess: str | None, as_json: bool) -> None:
    """Pause a pipeline, a subprocess, or a node.

    Running tasks finish and nothing new starts. With --node, the node (not reached yet) shows SUSPENDED
    and its path stops there when it arrives.
    """
    _one_target(node, subprocess)
    client = connect(ctx)
    if node:
        report(client.pause_node(pipeline_id, node), f"pause node {node} of {pipeline_id}", as_json)
    else:
        what = f"pause subprocess {subprocess} of {pipeline_id}" if subprocess else f"pause pipeline {pipeline_id}"
        report(client.pause_pipeline(pipeline_id, subprocess), what, as_json)


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@node_target_option
@subprocess_option
@json_option
@click.pass_context
def resume(ctx: click.Context, pipeline_id: str, node: str | None, subprocess: str | None, as_json: bool) -> None:
    """Resume a pipeline, a subprocess, or a node."""
    _one_target(node, subprocess)
    client = connect(ctx)
    if node:
        report(client.resume_node(pipeline_id, node), f"resume node {node} of {pipeline_id}", as_json)
    else:
        what = f"resume subprocess {subprocess} of {pipeline_id}" if subprocess else f"resume pipeline {pipeline_id}"
        report(client.resume_pipeline(pipeline_id, subprocess), what, as_json)


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@subprocess_option
@json_option
@click.pass_context
def revoke(ctx: click.Context, pipeline_id: str, subprocess: str | None, as_json: bool) -> None:
    """Revoke a pipeline or one subprocess.

    Unfinished nodes become REVOKED and the workers running them are told to cancel.
    """
    what = f"revoke subprocess {subprocess} of {pipeline_id}" if subprocess else f"revoke pipeline {pipeline_id}"
    report(connect(ctx).revoke_pipeline(pipeline_id, subprocess), what, as_json)


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@click.argument("node")
@click.option(
    "--inputs",
    metavar="JSON",
    callback=json_object,
    help="New inputs for the new attempt (JSON object); default: the old.",
)
@json_option
@click.pass_context
def retry(ctx: click.Context, pipeline_id: str, node: str, inputs: dict[str, Any] | None, as_json: bool) -> None:
    """Run a FAILED node again (a new attempt, retry + 1)."""
    report(connect(ctx).retry_node(pipeline_id, node, inputs), f"retry node {node} of {pipeline_id}", as_json)


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@click.argument("node")
@json_option
@click.pass_context
def skip(ctx: click.Context, pipeline_id: str, node: str, as_json: bool) -> None:
    """Skip a FAILED node: it counts as FINISHED.

    The tree must mark the node skippable; its outputs are not copied into variables.
    """
    report(connect(ctx).skip_node(pipeline_id, node), f"skip node {node} of {pipeline_id}", as_json)


@cli.command()
@click.argument("pipeline_id", metavar="ID")
@click.argument("node")
@click.argument("data", metavar="DATA", callback=json_value)
@click.option("--version", default=None, help="The node attempt to call back (default: its current one).")
@json_option
@click.pass_context
def callback(ctx: click.Context, pipeline_id: str, node: str, data: Any, version: str | None, as_json: bool) -> None:
    """Deliver DATA to a node awaiting a callback.

    DATA is any JSON value; it reaches the node's worker as a schedule task.
    """
    client = connect(ctx)
    if version is None:
        # The current attempt's version; an unknown or unreached node is the server's NOT_FOUND.
        version = str(client.get_node_data(pipeline_id, node)["version"])
    report(client.callback(pipeline_id, node, version, data), f"callback node {node} of {pipeline_id}", as_json)


@cli.command()
@click.argument("file", type=TREE_FILE)
@inputs_option
@cycle_option
@json_option
@click.pass_context
def validate(
    ctx: click.Context, file: IO[str], inputs: dict[str, Any] | None, cycle_tolerate: bool, as_json: bool
) -> None:
    """Check a pipeline tree without starting it.

    Prints OK, or each problem naming its node or flow (exit 1).
    """
    problems = connect(ctx).validate(read_tree(file), inputs, cycle_tolerate=cycle_tolerate)
    if as_json:
        print_json(problems)
    elif not problems:
        click.echo("OK")
    else:
        for problem in problems:
            where = ", ".join(
                f"{kind} {problem[key]}" for kind, key in (("node", "node_id"), ("flow", "flow_id")) if problem.get(key)
            )
            click.echo(f"{problem['code']}: {problem['message']}" + (f" ({where})" if where else ""))
    if problems:
        finish(ExitCode.REFUSED)


def main() -> None:
    cli(prog_name="pipelinectl")
