"""The package's module-level imports form no cycle (``functional → octo → nn → functional`` was one): each
module can be imported on its own, and layers only depend downwards."""

import ast
import pathlib

import edgelearn

PKG = pathlib.Path(edgelearn.__file__).parent


def _module_name(path):
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(path, name):
    """Modules of this package imported at module level (not inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ([node] if not isinstance(node, (ast.If, ast.Try)) else ast.walk(node)):
            if isinstance(sub, ast.ImportFrom):
                if sub.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - sub.level + 1]
                    mod = ".".join(base + ([sub.module] if sub.module else []))
                else:
                    mod = sub.module or ""
                if mod.startswith("edgelearn"):
                    out.add(mod)
                    out.update(f"{mod}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                out.update(a.name for a in sub.names if a.name.startswith("edgelearn"))
    return out


def test_no_import_cycle_in_the_package():
    files = {(_module_name(p)): p for p in PKG.rglob("*.py")}
    graph = {m: {d for d in _top_level_imports(p, m) if d in files and d != m} for m, p in files.items()}
    # a package's __init__ re-exporting its submodules is not a dependency of those submodules on it
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue  # a package importing its own submodules
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_octo_config_is_a_leaf():
    assert not _top_level_imports(PKG / "octo_config.py", "edgelearn.octo_config")
