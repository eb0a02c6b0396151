"""Tasks by name: the union of the ``TASKS`` tables of the task modules, imported on first use."""

from __future__ import annotations

from functools import cache
from importlib import import_module
from typing import Callable

from namm.tasks.base import Task

TASK_MODULES = ("namm.tasks.synthetic", "namm.tasks.longbench", "namm.tasks.infinitebench", "namm.tasks.choubun")


@cache
def _table() -> dict[str, Callable[[], Task]]:
    table: dict[str, Callable[[], Task]] = {}
    for module in TASK_MODULES:
        table.update(import_module(module).TASKS)
    return table


def task_names() -> list[str]:
    """Every task name, sorted."""
    return sorted(_table())


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming the choices otherwise."""
    table = _table()
    if name not in table:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]()
