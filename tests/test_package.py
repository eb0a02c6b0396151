"""The package's structure: no import cycles, explicit name tables, one wrapper base."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import namm
from namm.policies.registry import POLICIES, policy_class
from namm.policies.wrapped import WrappedPolicy
from namm.tasks.registry import get_task, task_names

SRC = Path(__file__).resolve().parents[1] / "src"


def module_imports() -> dict[str, set[str]]:
    """namm module -> the namm modules it imports anywhere in its body (lazy imports included);
    package ``__init__`` files, which only re-export, are left out."""
    files = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
             for f in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        if path.name == "__init__.py":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("namm"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("namm")}
        graph[name] = {d for d in deps if d in files and files[d].name != "__init__.py"}
    return graph


def test_no_import_cycles():
    graph, state, cycles = module_imports(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_policy_table_names_every_policy_class():
    assert namm.policy_names() == sorted(POLICIES)
    for name in POLICIES:
        assert policy_class(name).name == name
    with pytest.raises(ValueError, match="unknown policy 'nope'; choose one of: full, h2o"):
        policy_class("nope")


def test_registries_fill_without_importing_the_policy_package():
    code = ("import namm.policies.registry as r, namm.tasks.registry as t; "
            "print(type(r.make_policy('h2o', budget=0.5)).__name__, t.get_task('passkey').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["H2OPolicy", "passkey"]


def test_task_table():
    assert {"passkey", "niah_single", "longbench/qasper"} <= set(task_names())
    assert get_task("passkey").name == "passkey"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_a_wrapper_follows_what_its_policy_resolves_at_bind():
    class Late(namm.MemoryPolicy):
        name = "late"

        def bind(self, model) -> None:
            self.n_up, self.query_window = 64, 32

        def select(self, view):
            return view.valid

    inner = Late()
    wrapper = WrappedPolicy(inner)
    assert (wrapper.name, wrapper.n_up, wrapper.query_window, wrapper.evicts) == ("late", 512, 0, True)
    wrapper.bind(None)
    assert (wrapper.n_up, wrapper.query_window) == (64, 32)
    wrapper.schedule = "prompt-end"
    assert inner.schedule == "prompt-end" == wrapper.schedule
    with pytest.raises(ValueError, match="unknown schedule"):
        wrapper.schedule = "sometimes"
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    assert wrapper.select(type("View", (), {"valid": valid})()) is valid
