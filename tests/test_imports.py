"""The library never imports the orchestrator (STYLE habit 1), and its light modules stay light."""

from __future__ import annotations

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def test_import_captioning_pulls_in_neither_prefect_nor_mlflow() -> None:
    """A stage process that tracks to JSON lines (or nothing) never loads MLflow."""
    modules = imported_after(
        "import captioning, captioning.config, captioning.cli, captioning.vision, "
        "captioning.data.records, captioning.data.vocab, captioning.data.synthetic, "
        "captioning.train, captioning.stages, captioning.tracking.runs"
    )
    for heavy in ("prefect", "mlflow"):
        assert heavy not in modules, f"importing captioning imported {heavy}"


def test_config_records_vocab_do_not_import_torch() -> None:
    modules = imported_after(
        "import captioning.config, captioning.data.records, captioning.data.vocab, captioning.cli"
    )
    assert "torch" not in modules


def test_no_captioning_module_imports_prefect() -> None:
    """Every module of the library, imported in one process: the orchestrator stays out (habit 1)."""
    modules = imported_after(
        "import pkgutil, importlib, captioning; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(captioning.__path__, 'captioning.')]"
    )
    assert "captioning.train" in modules and "captioning.services.stack" in modules
    assert not {m for m in modules if m == "prefect" or m.startswith("prefect.")}


def module_graph() -> dict[str, set[str]]:
    """captioning module -> the captioning modules it imports (any import statement, lazy ones too)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / "captioning").rglob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_no_import_cycles_in_captioning() -> None:
    """No two modules import each other, directly or around a loop (package __init__ files excepted:
    they re-export their package's public names)."""
    graph = module_graph()
    packages = {name for name in graph if any(other.startswith(name + ".") for other in graph)}
    cycles = []
    for start in graph:
        if start in packages:
            continue
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node] - packages:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, cycles[:5]
