"""Variable rendering: plain and splice values, types kept for whole references, clear errors."""

from __future__ import annotations

import pytest

from engine_server.core.model import VarSpec
from engine_server.core.render import RenderError, render_context, render_inputs, splice_references


def test_a_value_that_is_exactly_one_reference_keeps_its_type() -> None:
    context = {"${n}": 5, "${items}": [1, 2]}
    rendered = render_inputs({"a": VarSpec("splice", "${n}"), "b": VarSpec("splice", "${ items }")}, context)
    assert rendered == {"a": 5, "b": [1, 2]}


def test_references_inside_text_lists_and_dicts_are_substituted() -> None:
    context = {"${who}": "ada", "${n}": 3}
    value = {"msg": "hi ${who} x${n}", "list": ["${who}", {"deep": "${n}!"}]}
    assert render_inputs({"v": VarSpec("splice", value)}, context) == {
        "v": {"msg": "hi ada x3", "list": ["ada", {"deep": "3!"}]}
    }


def test_plain_values_are_never_rendered() -> None:
    assert render_inputs({"v": VarSpec("plain", "${who}")}, {}) == {"v": "${who}"}


def test_data_inputs_may_refer_to_each_other_and_start_inputs_override_them() -> None:
    inputs = {
        "${a}": VarSpec("plain", 1),
        "${b}": VarSpec("splice", "a=${a}"),
        "${c}": VarSpec("splice", "${b}!"),
    }
    assert render_context(inputs, {}) == {"${a}": 1, "${b}": "a=1", "${c}": "a=1!"}
    assert render_context(inputs, {"a": 9})["${c}"] == "a=9!"


def test_circular_variables_are_named() -> None:
    inputs = {"${a}": VarSpec("splice", "${b}"), "${b}": VarSpec("splice", "${a}")}
    with pytest.raises(RenderError, match=r"circle: \$\{a\} -> \$\{b\} -> \$\{a\}"):
        render_context(inputs, {})


def test_references_are_found_for_validation() -> None:
    names, others = splice_references({"x": ["${a} and ${ b }", "${a + 1}"]})
    assert names == {"a", "b"}
    assert others == ["a + 1"]
