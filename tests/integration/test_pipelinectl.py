"""`pipelinectl` as an operator uses it: the installed command, run as a process against a real engine server
and a real Python worker, judged by its output and exit code.

One server (SQLite) serves the whole module: the CLI is a client of the engine's API, and the storage
backends are exercised by the other integration tests.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import ROOT, ServerProcess, WorkerProcess, free_port
from tests.trees import chain_tree
from worker_sdk import EngineClient

ENTRY_POINT = Path(sys.executable).with_name("pipelinectl")
COMMAND = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "pipelinectl"]


def plain(value: Any) -> dict[str, Any]:
    return {"type": "plain", "value": value}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("pipelinectl")
    server = ServerProcess(f"sqlite:///{log_dir / 'engine.db'}", log_dir=log_dir)
    worker = WorkerProcess(server.address, ["echo", "maybe_fail", "callback"], concurrency=4, log_dir=log_dir)
    try:
        server.start()
        worker.start()
        yield server
    finally:
        worker.stop()
        server.stop()


@pytest.fixture(scope="module")
def client(engine: ServerProcess) -> Iterator[EngineClient]:
    with EngineClient(engine.address) as engine_client:
        yield engine_client


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tree files: two echoes; a failing node then an echo; a callback node then an echo; an echo of the
    variable ${who}; a tree with a dangling flow; a file that is not JSON."""
    folder = tmp_path_factory.mktemp("trees")
    broken = chain_tree(["echo"])
    broken["flows"]["f1"]["target"] = "nowhere"
    shapes = {
        "ok": chain_tree(["echo", "echo"]),
        "failing": chain_tree(["maybe_fail", "echo"], inputs={"fail": plain(True), "value": plain(1)}),
        "callback": chain_tree(["callback", "echo"]),
        "greeting": chain_tree(
            ["echo"],
            inputs={"who": {"type": "splice", "value": "${who}"}},
            data_inputs={"${who}": plain("nobody")},
        ),
        "broken": broken,
    }
    paths = {}
    for name, tree in shapes.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(tree), encoding="utf-8")
    paths["not_json"] = folder / "not_json.json"
    paths["not_json"].write_text('{"id": "half a tree",', encoding="utf-8")
    return paths


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def run(engine: ServerProcess) -> Run:
    """Runs `pipelinectl ARGS...` with ENGINE_TARGET pointing at the engine, as an operator's shell would."""

    def run_cli(*args: str, target: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR", "FORCE_COLOR")}
        env["ENGINE_TARGET"] = target or engine.address
        env["PYTHONPATH"] = str(ROOT)
        return subprocess.run([*COMMAND, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)

    return run_cli


def node_line(output: str, state: str, node_id: str) -> str:
    """The line of the drawn tree for `node_id` in `state` (fails the test when there is none)."""
    match = re.search(rf"^.*\b{state}\s+{re.escape(node_id)}\b.*$", output, re.MULTILINE)
    assert match, f"no {state} line for {node_id!r} in:\n{output}"
    return match.group(0)


def wait_for_node(client: EngineClient, pipeline_id: str, node_id: str, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node = client.get_state(pipeline_id)["children"].get(node_id)
        if node is not None and node["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"node {node_id} of {pipeline_id} is not {state}: {client.get_state(pipeline_id)}")


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """A clean refusal: the exit code, the server's words on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


def test_help_documents_commands_and_exit_codes(run: Run) -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    commands = ("start", "state", "watch", "list", "pause", "resume", "revoke", "retry", "skip", "callback", "validate")
    for command in commands:
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command
    assert "ENGINE_TARGET" in result.stdout
    for code, meaning in (("0", "done"), ("1", "refused"), ("2", "usage"), ("3", "not found"), ("4", "unreachable")):
        assert re.search(rf"^\s+{code}\s+.*{meaning}", result.stdout, re.MULTILINE), (code, result.stdout)


def test_start_wait_then_state_and_list(run: Run, trees: dict[str, Path]) -> None:
    result = run("start", str(trees["ok"]), "--wait")
    assert result.returncode == 0, result.stderr
    pipeline_id, *tree_lines = result.stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f]{32}", pipeline_id)
    assert re.match(rf"pipeline {pipeline_id} .*FINISHED", tree_lines[0])
    for node_id in ("start", "a0", "a1", "end"):
        node_line(result.stdout, "FINISHED", node_id)

    state = run("state", pipeline_id)
    assert state.returncode == 0, state.stderr
    assert re.match(rf"pipeline {pipeline_id} .*FINISHED", state.stdout)
    # Reach order, each node with its type and duration.
    drawn = re.findall(r"FINISHED\s+(\w+).*\s(\w+)\s+\d+ ms$", state.stdout, re.MULTILINE)
    assert drawn == [
        ("start", "EmptyStartEvent"),
        ("a0", "ServiceActivity"),
        ("a1", "ServiceActivity"),
        ("end", "EmptyEndEvent"),
    ], state.stdout
    assert '"step 0"' in node_line(state.stdout, "FINISHED", "a0")  # the node's name

    as_json = run("state", pipeline_id, "--json")
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert document["id"] == pipeline_id and document["state"] == "FINISHED"
    assert list(document["children"]) == ["start", "a0", "a1", "end"]

    listed = run("list", "--state", "finished")
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^{pipeline_id}\s+FINISHED\s+tree\s", listed.stdout, re.MULTILINE), listed.stdout
    assert pipeline_id not in run("list", "--state", "FAILED").stdout
    summaries = {summary["id"]: summary for summary in json.loads(run("list", "--json").stdout)}
    assert summaries[pipeline_id]["state"] == "FINISHED"


def test_start_with_inputs_and_a_chosen_id(run: Run, trees: dict[str, Path], client: EngineClient) -> None:
    chosen = f"order-{time.time_ns()}"
    result = run("start", str(trees["greeting"]), "--id", chosen, "--inputs", '{"who": "Ada Lovelace"}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == chosen
    assert client.wait(chosen, timeout=10)["state"] == "FINISHED"
    assert client.get_node_data(chosen, "a0")["outputs"]["echo"]["who"] == "Ada Lovelace"

    waited = run("start", str(trees["greeting"]), "--id", f"{chosen}-2", "--wait", "--json")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["state"] == "FINISHED"

    again = run("start", str(trees["greeting"]), "--id", chosen)
    assert_refused(again, 1, "ALREADY_EXISTS", chosen)


def test_failed_pipeline_shows_the_error_and_retry_with_new_inputs_finishes_it(
    run: Run, trees: dict[str, Path], client: EngineClient
) -> None:
    result = run("start", str(trees["failing"]), "--wait")
    assert result.returncode == 1, (result.stdout, result.stderr)
    pipeline_id = result.stdout.splitlines()[0]
    node_line(result.stdout, "FAILED", "a0")
    assert "ValueError: asked to fail (value 1)" in result.stdout  # the node's ex_data, under the node

    state = run("state", pipeline_id)
    assert state.returncode == 0  # reading a failed pipeline's state succeeds
    assert re.search(r"FAILED\s+a0 .*\n.*asked to fail \(value 1\)", state.stdout), state.stdout
    assert json.loads(run("state", pipeline_id, "--json").stdout)["children"]["a0"]["ex_data"] == (
        "ValueError: asked to fail (value 1)"
    )

    retried = run("retry", pipeline_id, "a0", "--inputs", '{"fail": false, "value": 2}')
    assert retried.returncode == 0, retried.stderr
    assert "done" in retried.stdout
    assert client.wait(pipeline_id, timeout=10)["state"] == "FINISHED"
    after = run("state", pipeline_id).stdout
    assert "retry 1" in node_line(after, "FINISHED", "a0")
    assert "asked to fail" not in after

    assert_refused(run("retry", pipeline_id, "a0"), 1, "FAILED_PRECONDITION", "'a0'")
    assert_refused(run("skip", pipeline_id, "a0"), 1, "FAILED_PRECONDITION", "'a0'")


def test_skip_a_failed_node_and_watch_exit_codes(run: Run, trees: dict[str, Path], client: EngineClient) -> None:
    pipeline_id = run("start", str(trees["failing"])).stdout.strip()
    # Not a terminal: watch prints changes as lines, then the final tree; a FAILED pipeline exits 1.
    watched = run("watch", pipeline_id)
    assert watched.returncode == 1, (watched.stdout, watched.stderr)
    node_line(watched.stdout, "FAILED", "a0")

    skipped = run("skip", pipeline_id, "a0")
    assert skipped.returncode == 0, skipped.stderr
    assert client.wait(pipeline_id, timeout=10)["state"] == "FINISHED"
    assert "skipped" in node_line(run("state", pipeline_id).stdout, "FINISHED", "a0")

    # An ended pipeline: its current state as changes from nothing, one JSON object per line, the pipeline last.
    finished = run("watch", pipeline_id, "--json")
    assert finished.returncode == 0, finished.stderr
    changes = [json.loads(line) for line in finished.stdout.splitlines()]
    skipped_change = next(change for change in changes if change["node_id"] == "a0")
    assert (skipped_change["old_state"], skipped_change["new_state"]) == (None, "FINISHED")
    assert (changes[-1]["node_id"], changes[-1]["new_state"]) == (None, "FINISHED")


def test_pause_resume_revoke(run: Run, trees: dict[str, Path], client: EngineClient) -> None:
    pipeline_id = run("start", str(trees["callback"])).stdout.strip()
    wait_for_node(client, pipeline_id, "a0", "RUNNING")

    paused = run("pause", pipeline_id)
    assert (paused.returncode, paused.stdout.strip()) == (0, f"pause pipeline {pipeline_id}: done")
    again = run("pause", pipeline_id)
    assert again.returncode == 0 and "nothing to change" in again.stdout
    assert re.match(rf"pipeline {pipeline_id} .*SUSPENDED", run("state", pipeline_id).stdout)
    assert run("resume", pipeline_id).returncode == 0

    appointed = run("pause", pipeline_id, "--node", "a1")
    assert appointed.returncode == 0, appointed.stderr
    lines = run("state", pipeline_id).stdout.splitlines()
    assert re.match(rf"pipeline {pipeline_id} .*RUNNING", lines[0])
    node_line("\n".join(lines), "SUSPENDED", "a1")
    assert re.search(r"\ba1\b", lines[-1])  # not reached yet: drawn after the nodes that were
    assert run("resume", pipeline_id, "--node", "a1").returncode == 0
    assert not re.search(r"\ba1\b", run("state", pipeline_id).stdout)

    assert_refused(run("pause", pipeline_id, "--subprocess", "a0"), 1, "INVALID_ARGUMENT", "not a SubProcess")

    revoked = run("revoke", pipeline_id)
    assert revoked.returncode == 0, revoked.stderr
    assert client.get_state(pipeline_id)["state"] == "REVOKED"
    node_line(run("state", pipeline_id).stdout, "REVOKED", "a0")
    assert run("watch", pipeline_id).returncode == 1  # ended, but not FINISHED
    assert_refused(run("resume", pipeline_id), 1, "FAILED_PRECONDITION", "REVOKED")


class Terminal:
    """A command running on a pseudo-terminal of `rows` x `columns`, as in an operator's shell.

    Started with subprocess (not a fork of this multi-threaded test process); `expect` reads the screen's
    bytes until a pattern appears after the previous match.
    """

    def __init__(self, args: list[str], env: dict[str, str], rows: int = 40, columns: int = 140) -> None:
        self.fd, child_side = pty.openpty()
        fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.process = subprocess.Popen(
            args, stdin=child_side, stdout=child_side, stderr=child_side, env=env, cwd=ROOT, start_new_session=True
        )
        os.close(child_side)
        self.output = b""
        self._searched_to = 0
        self._closed = False

    def _read(self, timeout: float) -> bool:
        """Appends what the program wrote within `timeout`; False once it closed the terminal."""
        if self._closed:
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every holder of the terminal's other side is gone
            chunk = b""
        self._closed = not chunk
        self.output += chunk
        return not self._closed

    def expect(self, pattern: bytes, timeout: float = 15) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not (match := regex.search(self.output, self._searched_to)):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 0.2)):
                raise AssertionError(
                    f"{pattern!r} did not appear; the screen got:\n{self.output.decode(errors='replace')}"
                )
        self._searched_to = match.end()

    def wait(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.2):
            pass
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.fd)


def test_watch_in_a_terminal_redraws_as_a_callback_finishes_the_node(
    run: Run, trees: dict[str, Path], client: EngineClient, engine: ServerProcess
) -> None:
    pipeline_id = run("start", str(trees["callback"])).stdout.strip()
    env = {**os.environ, "ENGINE_TARGET": engine.address, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    watch = Terminal([*COMMAND, "watch", pipeline_id], env)
    try:
        # Between words on the screen: colour codes and padding.
        gap = rb"(?:\x1b\[[0-9;]*m|[ \t])+"
        watch.expect(rb"RUNNING" + gap + rb"a0")
        assert b"\x1b[" in watch.output  # a terminal gets colours
        wait_for_node(client, pipeline_id, "a0", "RUNNING")

        called = run("callback", pipeline_id, "a0", '{"approved": true}')
        assert called.returncode == 0, called.stderr

        # The same view, redrawn in place: the node finished, the path went on to the end.
        watch.expect(rb"FINISHED" + gap + rb"a0")
        watch.expect(rb"FINISHED" + gap + rb"end")
        assert watch.wait() == 0, watch.output.decode(errors="replace")
    finally:
        watch.close()
    assert b"\x1b[1A" in watch.output  # the cursor moved up: redrawn, not appended
    assert client.get_node_data(pipeline_id, "a0")["outputs"]["received"] == [{"approved": True}]


def test_callback_errors(run: Run, trees: dict[str, Path], client: EngineClient) -> None:
    pipeline_id = run("start", str(trees["callback"])).stdout.strip()
    wait_for_node(client, pipeline_id, "a0", "RUNNING")
    assert_refused(run("callback", pipeline_id, "a1", "{}"), 3, "NOT_FOUND", "'a1'")  # not reached yet
    assert_refused(run("callback", pipeline_id, "a0", "{oops"), 2, "DATA", "not valid JSON")
    assert_refused(run("callback", pipeline_id, "a0", "1", "--version", "v999"), 1, "FAILED_PRECONDITION", "v999")
    assert run("callback", pipeline_id, "a0", '"go"').returncode == 0
    assert client.wait(pipeline_id, timeout=10)["state"] == "FINISHED"
    assert_refused(run("callback", pipeline_id, "a0", '"late"'), 1, "FAILED_PRECONDITION")


def test_unknown_pipeline_exits_3_with_the_servers_message(run: Run) -> None:
    unknown = "no-such-pipeline"
    for command in (
        ["state", unknown],
        ["watch", unknown],
        ["pause", unknown],
        ["resume", unknown, "--node", "a0"],
        ["revoke", unknown],
        ["skip", unknown, "a0"],
    ):
        assert_refused(run(*command), 3, f"NOT_FOUND: pipeline '{unknown}' does not exist")


def test_usage_errors_exit_2(run: Run, trees: dict[str, Path]) -> None:
    ok = str(trees["ok"])
    assert_refused(run("start", ok, "--inputs", "{not json"), 2, "--inputs", "not valid JSON")
    assert_refused(run("start", ok, "--inputs", "[1, 2]"), 2, "--inputs", "JSON object")
    assert_refused(run("start", str(trees["ok"].with_name("missing.json"))), 2, "missing.json")
    assert_refused(run("start", str(trees["not_json"])), 2, "not_json.json is not valid JSON")
    assert_refused(run("validate", str(trees["not_json"])), 2, "not valid JSON")
    assert_refused(run("pause", "some-id", "--node", "a", "--subprocess", "b"), 2, "not both")
    assert_refused(run("list", "--state", "SLEEPING"), 2, "SLEEPING")


def test_validate_and_start_a_broken_tree(run: Run, trees: dict[str, Path]) -> None:
    valid = run("validate", str(trees["ok"]))
    assert (valid.returncode, valid.stdout) == (0, "OK\n")

    broken = run("validate", str(trees["broken"]))
    assert broken.returncode == 1, broken.stderr
    assert re.search(r"^dangling_flow: .*'nowhere'.*\(flow f1\)$", broken.stdout, re.MULTILINE), broken.stdout
    problems = json.loads(run("validate", str(trees["broken"]), "--json").stdout)
    assert any(problem["flow_id"] == "f1" for problem in problems)

    assert_refused(run("start", str(trees["broken"])), 1, "INVALID_ARGUMENT", "'nowhere'")


def test_unreachable_engine_exits_4(run: Run, trees: dict[str, Path], engine: ServerProcess) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    for args in (["state", "any-id"], ["watch", "any-id"], ["list"], ["start", str(trees["ok"])]):
        assert_refused(run(*args, target=nobody), 4, f"cannot reach the engine at {nobody}", "UNAVAILABLE")
    # --target wins over ENGINE_TARGET.
    assert run("--target", engine.address, "list", target=nobody).returncode == 0
