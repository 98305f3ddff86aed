"""The benchmark scenarios, by name. To add one: write a module with a `Scenario`, list it here."""

from __future__ import annotations

from bench.scenarios.bamboo import BAMBOO_17
from bench.scenarios.base import RunResult, Scenario, ScenarioContext
from bench.scenarios.chain import CHAIN_1000
from bench.scenarios.chains import CHAINS_100X17
from bench.scenarios.fanout import FANOUT_1000
from bench.scenarios.idle import IDLE_10K
from bench.scenarios.independent import INDEPENDENT_2000
from bench.scenarios.sustained import SUSTAINED

# The scenarios of issue 6, in the order `make bench` runs them.
DEFAULT_SCENARIOS: tuple[Scenario, ...] = (BAMBOO_17, FANOUT_1000, CHAIN_1000, CHAINS_100X17, SUSTAINED, IDLE_10K)
# Selectable with --scenario, not run by default (`sustained` measures throughput under load better).
EXTRA_SCENARIOS: tuple[Scenario, ...] = (INDEPENDENT_2000,)

SCENARIOS: dict[str, Scenario] = {scenario.name: scenario for scenario in (*DEFAULT_SCENARIOS, *EXTRA_SCENARIOS)}

__all__ = ["DEFAULT_SCENARIOS", "SCENARIOS", "RunResult", "Scenario", "ScenarioContext"]
