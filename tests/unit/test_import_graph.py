"""megarl's package-level import graph has no cycles.

Nodes are the sub-packages (``megarl.megatron``, ``megarl.rollout``, ``megarl.convert``, ...)
and the top-level modules (``megarl.trainer``, ``megarl.config``, ...); an edge is any import
between two of them, function-local imports included (read from the source, not executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megarl"


def node_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {name for name in found if name == "megarl" or name.startswith("megarl.")}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = node_of(module_name(path))
        for target in map(node_of, imports_of(path)):
            if target != source and target != "megarl":
                graph.setdefault(source, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_import_graph_is_acyclic() -> None:
    graph = import_graph()
    assert {"megarl.megatron", "megarl.rollout", "megarl.convert"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    # function-local imports count: the rollout package must not reach back into megatron
    rollout_imports = set().union(*(imports_of(p) for p in (PACKAGE / "rollout").glob("*.py")))
    assert not any(name.startswith("megarl.megatron") for name in rollout_imports)


def third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_megatron_imports_megatron_core_and_only_the_vllm_engine_imports_vllm() -> None:
    """The rules of docs/architecture.md: megatron-core stays in megarl/megatron/, vLLM in
    megarl/rollout/vllm.py, and the losses import neither."""
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        used = third_party_imports(path)
        if "megatron" in used:
            assert where.startswith("megatron/"), where
        if "vllm" in used:
            assert where == "rollout/vllm.py", where
        if where.startswith("losses/"):
            assert not used & {"megatron", "vllm", "transformer_engine"}, where
