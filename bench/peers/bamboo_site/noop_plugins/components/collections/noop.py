"""`noop`: the benchmark's trivial component, so that what is measured is bamboo's own overhead."""

from pipeline.component_framework.component import Component
from pipeline.core.flow.activity import Service

NOOP = "noop"


class NoopService(Service):
    def execute(self, data, parent_data):
        # Echo the input, as the engine benchmark's worker does, so every node has a small output.
        data.outputs.i = data.get_one_of_inputs("i", 0)
        return True

    def outputs_format(self):
        return [Service.OutputItem(name="echo of i", key="i", type="int")]


class NoopComponent(Component):
    name = "noop"
    code = NOOP
    bound_service = NoopService
