"""`make lint`'s structure checks (ruff covers style): exits 1 and lists every problem.

1. No import circle between the project's modules (cman, jobs, tuning, serve_app). Every import counts, also those
   inside functions; code under `if __name__ == "__main__":` does not (it never runs on import).
2. No private name of another package: `ray._private...`, `from x import _name`, `module._name` on an imported module.
3. No function over MAX_LINES lines in the packages unless its docstring says why (a line starting `Long:`).

Usage: python tools/check_structure.py [--max-lines 60]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cman", "jobs", "tuning", "serve_app")
MAX_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` or `if TYPE_CHECKING:` (neither imports anything when the module is imported)."""
    test = getattr(node, "test", None)
    if not isinstance(node, ast.If):
        return False
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    return isinstance(test, ast.Compare) and getattr(test.left, "id", "") == "__name__"


def _walk(tree: ast.AST):
    """ast.walk, skipping `if __name__ == "__main__":` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _main_guard(child))


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in the file."""
    out = []
    for node in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, "", node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(name, path).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in known else (base, alias.name, node.lineno))
    return out


def import_cycles(known: dict[str, Path]) -> list[str]:
    graph = {name: set() for name in known}
    for name, path in known.items():
        for module, _, _ in imports(name, path, known):
            if module in known and module != name:
                graph[name].add(module)
    return [" -> ".join([*cycle, cycle[0]]) for cycle in _strongly_connected(graph) if len(cycle) > 1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                result.append(sorted(component))
    return result


def private_names(known: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in known.items():
        top = name.split(".")[0]
        aliases: dict[str, str] = {}
        for module, imported, line in imports(name, path, known):
            if module.split(".")[0] == top:
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            if any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                problems.append(f"{where}: imports private module {module}")
            if imported.startswith("_") and not imported.startswith("__"):
                problems.append(f"{where}: imports private name {module}.{imported}")
        tree = ast.parse(path.read_text())
        for node in _walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                    if full.split(".")[0] != top:
                        aliases[alias.asname or alias.name.split(".")[0]] = full
        for node in _walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: uses private {node.value.id}.{node.attr}")
    return problems


def long_functions(known: dict[str, Path], max_lines: int) -> list[str]:
    problems = []
    for path in known.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if length > max_lines and not any(line.strip().startswith("Long:") for line in doc.splitlines()):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name} has {length} lines")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    args = parser.parse_args(argv)
    known = modules()
    problems = [f"import circle: {c}" for c in import_cycles(known)]
    problems += private_names(known)
    problems += [
        f"{p} (over {args.max_lines}; give the reason in a `Long:` docstring line)"
        for p in long_functions(known, args.max_lines)
    ]
    for problem in problems:
        print(problem)
    print(f"structure: {len(problems)} problem(s) in {len(known)} modules", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
