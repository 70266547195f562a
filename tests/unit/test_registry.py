"""The generic registry every pluggable family uses (engine/registry.py): names, options, capabilities."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine.registry import DuplicateName, Registry, UnknownName, UnknownOption


@dataclass(frozen=True)
class Caps:
    fast: bool


def shapes() -> Registry[tuple, Caps]:
    reg: Registry[tuple, Caps] = Registry("shape")

    @reg.register("square", caps=Caps(fast=True))
    def square(side: int, *, color: str = "red") -> tuple:
        return ("square", side, color)

    reg.register("dot", lambda: ("dot",), caps=Caps(fast=False))  # the call form
    return reg


def test_created_by_name_with_its_arguments_and_options():
    reg = shapes()
    assert reg.create("square", 3, color="blue") == ("square", 3, "blue")
    assert reg.create("square", 2) == ("square", 2, "red")
    assert reg.create("dot") == ("dot",)
    assert reg.get("dot")() == ("dot",)
    assert reg.names() == ("dot", "square") and reg.names(ordered=True) == ("square", "dot")
    assert "square" in reg and "circle" not in reg


def test_an_unknown_name_is_a_value_error_listing_the_known_ones():
    reg = shapes()
    with pytest.raises(UnknownName, match=r"^unknown shape 'circle' \(known: dot, square\)$"):
        reg.create("circle")
    with pytest.raises(ValueError, match=r"^outline: unknown shape 'circle' \(known: dot, square\)$"):
        reg.check("circle", field="outline")
    with pytest.raises(UnknownName):
        reg.caps("circle")


def test_an_unknown_option_is_rejected_naming_it_and_the_allowed_ones():
    reg = shapes()
    with pytest.raises(UnknownOption, match=r"shape 'square': unknown option 'colour' \(allowed: color\)"):
        reg.create("square", 3, colour="blue")
    with pytest.raises(ValueError, match=r"shape 'dot': unknown option 'size' \(allowed: none\)"):
        reg.create("dot", size=1)
    assert reg.options("square") == {"color"}


def test_select_passes_each_entry_only_the_options_it_takes():
    reg = shapes()
    assert reg.select("square", color="blue", size=2) == {"color": "blue"}
    assert reg.select("dot", color="blue") == {}


def test_a_name_registers_once():
    reg = shapes()
    with pytest.raises(DuplicateName, match="shape 'dot' is registered twice"):
        reg.register("dot", lambda: ("other dot",))
    assert reg.create("dot") == ("dot",)


def test_capability_records_are_looked_up_by_name():
    reg = shapes()
    assert reg.caps("square") == Caps(fast=True)
    assert [n for n in reg.names() if reg.caps(n).fast] == ["square"]


def test_a_factory_taking_any_keyword_must_declare_its_options():
    reg: Registry[dict, None] = Registry("bag")
    with pytest.raises(TypeError, match="declare its options"):
        reg.register("loose", lambda **kw: kw)
    reg.register("declared", lambda **kw: kw, options=("a",))
    assert reg.create("declared", a=1) == {"a": 1}
    with pytest.raises(UnknownOption, match="'b'"):
        reg.create("declared", b=1)


def test_the_registry_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, engine.registry; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
