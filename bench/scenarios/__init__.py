"""The benchmark scenarios, by name. To add one: write a module with a `Scenario`, list it here."""

from __future__ import annotations

from bench.scenarios.base import RunResult, Scenario, ScenarioContext
from bench.scenarios.chain import CHAIN_1000
from bench.scenarios.independent import INDEPENDENT_2000

SCENARIOS: dict[str, Scenario] = {scenario.name: scenario for scenario in (CHAIN_1000, INDEPENDENT_2000)}

__all__ = ["SCENARIOS", "RunResult", "Scenario", "ScenarioContext"]
