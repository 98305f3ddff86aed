"""The Node.js worker (examples/node-worker) end to end: a real engine server, the Node worker and a Python worker as
real processes, one pipeline whose activities alternate between the two languages, and the Node worker's
retry, failure, polling, cancellation and shutdown paths as a user sees them through EngineClient."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_SERVICES
from tests.support.module_engine import Engine, module_engine
from tests.support.processes import ROOT, ServerProcess
from tests.support.workers import MADE_IN_PYTHON, json_types
from worker_sdk import EngineClient
from worker_sdk.builder import Data, EmptyEndEvent, EmptyStartEvent, NodeOutput, ServiceActivity, Var, build_tree

NODE_WORKER_DIR = ROOT / "examples" / "node-worker"

# Every kind of JSON value, as a Python worker hands it on. No whole-number floats: JavaScript has one number
# type, so 2.0 comes back as 2 (see test_documented_limits_of_javascript_numbers).
ORIGINAL: dict[str, Any] = {
    "text": "héllo 世界 🚀",
    "escapes": 'quote " backslash \\ newline \n tab \t',
    "integer": 42,
    "zero": 0,
    "negative": -7,
    "largest_exact": 2**53 - 1,
    "smallest_exact": -(2**53 - 1),
    "float": 3.25,
    "negative_float": -0.5,
    "tiny": 1e-7,
    "subnormal": 5e-324,
    "huge_float": 1.7976931348623157e308,
    "yes": True,
    "no": False,
    "nothing": None,
    "nested": {
        "list": [1, 2.5, "three", None, True, {"deep": ["ü", {"deeper": 0.75}]}],
        "empty_object": {},
        "empty_list": [],
    },
}

# What examples/node-worker/worker.js makes itself (MADE_IN_NODE there), as Python must read it.
MADE_IN_NODE: dict[str, Any] = {
    "text": "héllo 世界 🚀 from Node.js",
    "integer": 9_007_199_254_740_991,
    "float": 0.1 + 0.2,
    "negative": -42,
    "yes": True,
    "no": False,
    "nothing": None,
    "nested": {"list": [1, "two", 3.5, False, None, {"deep": ["ü"]}], "empty_object": {}, "empty_list": []},
}


def _node_worker_problem() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "the `node` executable is not on PATH (examples/node-worker needs Node.js 20+)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = version.lstrip("v").split(".", 1)[0]
    if not major.isdigit() or int(major) < 20:
        return f"node {version or '(unknown version)'} is too old: examples/node-worker needs Node.js 20+"
    if not (NODE_WORKER_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "examples/node-worker/node_modules is missing: `make test` installs it (npm ci), or run `npm ci` there"
    return None


@pytest.fixture(scope="module")
def node_ready() -> None:
    problem = _node_worker_problem()
    if problem:
        if REQUIRE_SERVICES:
            pytest.fail(f"{problem}; ENGINE_TEST_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(problem)


class NodeWorkerProcess:
    """`node examples/node-worker/worker.js` against a server, with its own log file."""

    def __init__(self, address: str, log_dir: Path, *, concurrency: int = 8) -> None:
        self.command = [
            "node",
            str(NODE_WORKER_DIR / "worker.js"),
            "--target",
            address,
            "--concurrency",
            str(concurrency),
            "--poll-wait-ms",
            "5000",
        ]
        self.log_path = log_dir / "node-worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("ENGINE_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """The first log line containing `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"the Node worker did not log {text!r} within {timeout}s; its log:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class Polyglot:
    def __init__(self, engine: Engine, node_worker: NodeWorkerProcess) -> None:
        self.engine = engine
        self.client = engine.client
        self.node_worker = node_worker


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def polyglot(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, node_ready: None
) -> Iterator[Polyglot]:
    """One server (3 s leases: heartbeats every second), a Python worker serving py_transform, a Node worker."""
    # module_engine yields once; looping resumes it afterwards, so it stops its server and worker.
    for engine in module_engine(request, tmp_path_factory, ["py_transform"], server_args=["--lease-ms", "3000"]):
        node_worker = NodeWorkerProcess(engine.server.address, tmp_path_factory.mktemp("node"))
        node_worker.start()
        try:
            yield Polyglot(engine, node_worker)
        finally:
            node_worker.stop()


def assert_same_typed(actual: Any, expected: Any, path: str = "value") -> None:
    """Equal, and of exactly the same type at every level (1 is not 1.0, True is not 1)."""
    assert type(actual) is type(expected), (
        f"{path}: got {type(actual).__name__} {actual!r}, expected {type(expected).__name__} {expected!r}"
    )
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same_typed(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_same_typed(got, want, f"{path}[{index}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def activity(code: str, **inputs: Any) -> ServiceActivity:
    """Inputs are plain values, or splices when they mention ${...}."""
    node = ServiceActivity(component_code=code)
    for key, value in inputs.items():
        kind = Var.SPLICE if isinstance(value, str) and "${" in value else Var.PLAIN
        setattr(node.component.inputs, key, Var(type=kind, value=value))
    return node


def chain(*nodes: ServiceActivity, data: Data | None = None) -> dict[str, Any]:
    start = EmptyStartEvent()
    tail: Any = start
    for node in nodes:
        tail = tail.extend(node)
    tail.extend(EmptyEndEvent())
    return build_tree(start, data=data)


# ---------------------------------------------------------------- values cross languages with their types


def test_values_cross_python_node_python_node_with_their_types(polyglot: Polyglot) -> None:
    languages = ["python", "node", "python", "node"]
    variables = Data()
    variables.inputs["${original}"] = Var(type=Var.PLAIN, value=ORIGINAL)
    nodes = [activity("py_transform", value="${original}", hops=0, trail=[])]
    for hop, language in enumerate(languages[1:], start=1):
        previous, made_by = nodes[-1], f"made_in_{languages[hop - 1]}"
        # Each activity reads the previous one's outputs through node-output variables.
        for key, source_key in (("echo", "echo"), ("hops", "hops"), ("trail", "trail"), ("made", made_by)):
            variables.inputs[f"${{{key}_{hop}}}"] = NodeOutput(source_act=previous.id, source_key=source_key)
        code = "py_transform" if language == "python" else "node_transform"
        nodes.append(
            activity(
                code,
                value=f"${{echo_{hop}}}",
                hops=f"${{hops_{hop}}}",
                trail=f"${{trail_{hop}}}",
                extra=f"${{made_{hop}}}",
            )
        )
    pipeline_id, state = polyglot.engine.run(chain(*nodes, data=variables))
    assert state["state"] == "FINISHED", polyglot.node_worker.log()
    outputs = [polyglot.engine.outputs(pipeline_id, node.id) for node in nodes]

    # The value went Python -> Node -> Python -> Node and comes back to this (Python) client unchanged.
    assert_same_typed(outputs[-1]["echo"], ORIGINAL)
    assert outputs[-1]["hops"] == 4 and outputs[-1]["trail"] == languages
    # Each worker saw the same types: JavaScript numbers with a fraction are floats, whole ones integers.
    for output in outputs:
        assert output["types"] == json_types(ORIGINAL)
    # Values made in JavaScript reach the Python worker typed (and the Python client, and the next Node worker).
    assert_same_typed(outputs[2]["extra"], MADE_IN_NODE, "made_in_node as the Python worker got it")
    assert outputs[2]["extra_types"] == json_types(MADE_IN_NODE)
    assert_same_typed(outputs[1]["made_in_node"], MADE_IN_NODE, "made_in_node as the client reads it")
    assert_same_typed(outputs[3]["extra"], MADE_IN_PYTHON, "made_in_python after a trip through Node.js")
    assert outputs[3]["extra_types"] == json_types(MADE_IN_PYTHON)
    # What the Node worker was given is exactly what the engine rendered from the Python worker's outputs.
    node_inputs = polyglot.client.get_node_data(pipeline_id, nodes[1].id)["inputs"]
    assert_same_typed(node_inputs["value"], ORIGINAL, "the Node worker's inputs")


def test_documented_limits_of_javascript_numbers(polyglot: Polyglot) -> None:
    """docs/worker-protocol.md and the Node worker's README promise exactly this."""
    value = {"whole_float": 2.0, "beyond_2_53": 2**53 + 1, "huge_integer": 10**21}
    node = activity("node_transform", value=value)
    pipeline_id, state = polyglot.engine.run(chain(node))
    assert state["state"] == "FINISHED"
    echo = polyglot.engine.outputs(pipeline_id, node.id)["echo"]
    # A float with no fraction is written back as an integer; integers beyond 2^53 lose precision, and from
    # 10^21 on JavaScript writes them in exponent form, which reads back as a float.
    assert_same_typed(echo, {"whole_float": 2, "beyond_2_53": 2**53, "huge_integer": 1e21})
    warning = polyglot.node_worker.wait_for_log(f"node {node.id}): inputs value.beyond_2_53, value.huge_integer hold")
    assert "beyond 2^53" in warning


# ---------------------------------------------------------------- failures, retries, polling, cancellation


def test_a_retryable_node_failure_is_retried_to_success(polyglot: Polyglot) -> None:
    node = activity("node_flaky", fail_times=2, retry_after_ms=50)
    pipeline_id, state = polyglot.engine.run(chain(node))
    assert state["state"] == "FINISHED"
    assert (state["children"][node.id]["state"], state["children"][node.id]["retry"]) == ("FINISHED", 2)
    assert polyglot.engine.outputs(pipeline_id, node.id)["succeeded_on_retry"] == 2
    histories = polyglot.client.get_node_histories(pipeline_id, node.id)
    assert [(h["state"], h["retry"]) for h in histories] == [("FAILED", 0), ("FAILED", 1)]
    assert [h["outputs"]["ex_data"] for h in histories] == [
        "RetryableError: node_flaky: transient failure on retry 0",
        "RetryableError: node_flaky: transient failure on retry 1",
    ]


def test_a_non_retryable_node_failure_fails_the_node_with_its_message(polyglot: Polyglot) -> None:
    failing, after = activity("node_flaky", fail_permanently=True, message="disk on fire 🔥"), activity("py_transform")
    pipeline_id, state = polyglot.engine.run(chain(failing, after))
    assert state["state"] == "FAILED"
    assert (state["children"][failing.id]["state"], state["children"][failing.id]["retry"]) == ("FAILED", 0)
    assert after.id not in state["children"]
    data = polyglot.client.get_node_data(pipeline_id, failing.id)
    assert data["ex_data"] == "Error: disk on fire 🔥"
    assert data["outputs"]["_result"] is False
    assert polyglot.client.get_node_histories(pipeline_id, failing.id) == []


def test_a_node_polling_component_polls_then_completes(polyglot: Polyglot) -> None:
    node = activity("node_poll", polls=3, interval_ms=50)
    pipeline_id, state = polyglot.engine.run(chain(node))
    assert state["state"] == "FINISHED"
    assert state["children"][node.id]["schedule_times"] == 3
    outputs = polyglot.engine.outputs(pipeline_id, node.id)
    # Outputs kept by each poll-again reply reach the next schedule run.
    assert (outputs["polls"], outputs["checks"]) == (3, [1, 2, 3])
    assert outputs["took_ms"] >= 3 * 50


def test_the_node_worker_runs_tasks_concurrently(polyglot: Polyglot) -> None:
    sleepers = [activity("node_sleep", seconds=1) for _ in range(6)]
    started = time.monotonic()
    pipeline_ids = [polyglot.client.start(chain(node)) for node in sleepers]
    for pipeline_id in pipeline_ids:
        assert polyglot.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"
    # Six one-second tasks on eight slots: together, not one after another.
    assert time.monotonic() - started < 4


def test_revoking_a_pipeline_aborts_the_running_node_component(polyglot: Polyglot) -> None:
    node = activity("node_sleep", seconds=60)
    pipeline_id = polyglot.client.start(chain(node))
    polyglot.node_worker.wait_for_log(f"node_sleep: node {node.id} started")
    assert polyglot.client.revoke_pipeline(pipeline_id) is True
    # The next heartbeat (a third of the 3 s lease) answers cancel_requested; the AbortSignal fires.
    stopped = polyglot.node_worker.wait_for_log(f"node_sleep: node {node.id} stopped after", timeout=10)
    assert "the engine asked to cancel" in stopped
    assert float(stopped.split(" stopped after ")[1].split(" s")[0]) < 10
    state = polyglot.client.wait(pipeline_id, timeout=10)
    assert (state["state"], state["children"][node.id]["state"]) == ("REVOKED", "REVOKED")


# ---------------------------------------------------------------- shutdown


def test_sigterm_lets_running_tasks_finish_and_stops_polling(
    node_ready: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("drain")
    server = ServerProcess(f"sqlite:///{folder / 'engine.db'}", log_dir=folder, extra_args=["--lease-ms", "3000"])
    server.start()
    node_worker = NodeWorkerProcess(server.address, folder)
    try:
        node_worker.start()
        with EngineClient(server.address) as client:
            running = activity("node_sleep", seconds=1)
            running_pipeline = client.start(chain(running))
            node_worker.wait_for_log(f"node_sleep: node {running.id} started")
            assert node_worker.process is not None
            node_worker.process.send_signal(signal.SIGTERM)
            node_worker.wait_for_log("received SIGTERM")
            late = activity("node_sleep", seconds=0)
            late_pipeline = client.start(chain(late))
            assert node_worker.process.wait(timeout=15) == 0
            assert client.wait(running_pipeline, timeout=10)["state"] == "FINISHED"
            # Nothing was claimed after SIGTERM: the late pipeline waits for a worker.
            assert client.get_state(late_pipeline)["children"][late.id]["state"] == "RUNNING"
            assert f"node {late.id} started" not in node_worker.log()
    finally:
        node_worker.stop()
        server.stop()
