"""Builds a pipeline with the builder, starts it, waits for it and prints its state tree.

python examples/start_pipeline.py --name Ada
"""

from __future__ import annotations

import argparse
import json

from worker_sdk import (
    Data,
    EmptyEndEvent,
    EmptyStartEvent,
    EngineClient,
    ServiceActivity,
    Var,
    WaitTimeout,
    build_tree,
)


def hello_tree() -> dict[str, object]:
    start = EmptyStartEvent()
    greet = ServiceActivity(component_code="greet", name="greet")
    greet.component.inputs.name = Var(type=Var.SPLICE, value="${name}")
    shout = ServiceActivity(component_code="shout", name="shout")
    shout.component.inputs.text = Var(type=Var.SPLICE, value="${name} was here")
    start.extend(greet).extend(shout).extend(EmptyEndEvent())

    data = Data()
    data.inputs["${name}"] = Var(type=Var.PLAIN, value="world")
    return build_tree(start, data=data)


def print_state(client: EngineClient, state: dict[str, object], pipeline_id: str) -> None:
    print(f"pipeline {pipeline_id}: {state['state']}")
    children = state["children"]
    assert isinstance(children, dict)
    for node_id, node in children.items():
        elapsed = node["elapsed_time"]
        took = f"{elapsed * 1000:.0f} ms" if elapsed is not None else "-"
        print(f"  {node['type']:<16} {node['name'] or node_id[:8]:<8} {node['state']:<9} {took}")
        if node["type"] == "ServiceActivity":
            data = client.get_node_data(pipeline_id, node_id)
            print(f"      inputs  {json.dumps(data['inputs'], ensure_ascii=False)}")
            print(f"      outputs {json.dumps(data['outputs'], ensure_ascii=False)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="engine server address")
    parser.add_argument("--name", default="world", help="value of the pipeline variable ${name}")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the pipeline to end")
    args = parser.parse_args()
    with EngineClient(args.target) as client:
        pipeline_id = client.start(hello_tree(), {"name": args.name})
        print(f"started {pipeline_id}; waiting (is examples/hello_worker.py running?)")
        try:
            state = client.wait(pipeline_id, timeout=args.wait)
        except WaitTimeout as timeout:
            state_name = timeout.state["state"] if timeout.state else "RUNNING"
            print(f"still {state_name} after {args.wait:g} s: is a worker serving 'greet' and 'shout' running?")
            print("The pipeline carries on as soon as one connects.")
            return
        print_state(client, state, pipeline_id)


if __name__ == "__main__":
    main()
