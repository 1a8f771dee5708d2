"""No two fl_ec modules import each other, however indirectly.

``lint-imports`` checks the layers (``[tool.importlinter]`` in pyproject.toml); within a
layer modules may import each other, and this test keeps those imports free of
cycles. Every import counts: at module level, inside functions, and under
``if TYPE_CHECKING:``.
"""

from __future__ import annotations

from collections.abc import Iterator

import grimp


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of two or more modules (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def imports(module: str) -> Iterator[str]:
        return iter(sorted(graph.find_modules_directly_imported_by(module)))

    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, imports(root))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, imported = work[-1]
            for other in imported:
                if other not in index:
                    index[other] = low[other] = len(index)
                    stack.append(other)
                    on_stack.add(other)
                    work.append((other, imports(other)))
                    break
                if other in on_stack:
                    low[module] = min(low[module], index[other])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """One import chain around ``cycle``: ``a -> b -> ... -> a``."""
    first, second = cycle[0], cycle[1]
    there = graph.find_shortest_chain(importer=first, imported=second) or (first, second)
    back = graph.find_shortest_chain(importer=second, imported=first) or (second, first)
    return " -> ".join([*there, *back[1:]])


def test_no_import_cycle_in_fl_ec():
    graph = grimp.build_graph("fl_ec", cache_dir=None)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import():
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")  # e.g. inside a function
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert describe(graph, ["pkg.a", "pkg.b", "pkg.c"]) == "pkg.a -> pkg.b -> pkg.c -> pkg.a"
