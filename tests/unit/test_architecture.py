"""The package's layers (docs/architecture.md), checked from its source and from a real import.

(a) every module's imports, read with ``ast``: arrows point down only (tools/cli/testing/demo ->
manager -> guard -> core), no cycle among ckptguard modules, and no function-level import of a
ckptguard module outside the CLI; (b) a plain save()/load() loads no tool, CLI, testing or demo
module; (c) the docs' recipe for a new kind of state, followed with a toy one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import ckptguard
from ckptguard import CheckpointManager
from ckptguard.core import states

PKG = Path(ckptguard.__file__).resolve().parent

# layer of a module -> the layers it must never import
FORBIDDEN = {
    "core": ("guard", "manager", "tools", "cli", "testing", "demo", "runcontrol"),
    "guard": ("manager", "tools", "cli", "testing", "demo"),
    "manager": ("tools", "cli", "testing", "demo"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported ckptguard module, at function level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    known = _modules()
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                # "from ckptguard.core import dist" imports the submodule ckptguard.core.dist
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            for name in names:
                if name == "ckptguard" or name.startswith("ckptguard."):
                    found.append((name, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_imports_point_down_with_no_cycle_and_no_function_level_import():
    modules = _modules()
    problems = []
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        layer = _layer(module)
        for name, in_function in _imports(module, path):
            if in_function and module != "ckptguard.cli":
                problems.append(f"{module}: function-level import of {name} (break the cycle instead)")
            target = _layer(name)
            if target in FORBIDDEN.get(layer, ()):
                problems.append(f"{module} ({layer}) imports {name} ({target}): an arrow pointing up")
            if not in_function and name in modules and name != module:
                graph.setdefault(module, set()).add(name)

    # a cycle: depth-first search with colours
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                problems.append("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            dfs(module)
    assert not problems, "\n".join(problems)


def test_a_plain_save_and_load_loads_no_tool_cli_testing_or_demo_module(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import torch
        from ckptguard import CheckpointManager
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        with CheckpointManager({str(tmp_path)!r}, model=model, optimizer=opt) as mgr:
            mgr.save(1)
        with CheckpointManager({str(tmp_path)!r}, model=model, optimizer=opt) as mgr:
            assert mgr.load() == 1
        above = ("ckptguard.tools", "ckptguard.cli", "ckptguard.testing", "ckptguard.demo")
        print(sorted(m for m in sys.modules if m.startswith(above)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------- the docs' recipe


class StepCounter:
    """A toy kind of state: a process-wide count of optimizer steps."""

    count = 0


class StepCounterState:
    """The recipe's adapter (docs/architecture.md): the state protocol plus ``per_rank``."""

    per_rank = True

    def state_dict(self) -> dict[str, int]:
        return {"count": StepCounter.count}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        StepCounter.count = int(state_dict["count"])


def test_a_new_kind_of_state_is_one_adapter_registered_in_one_module(tmp_path, monkeypatch):
    monkeypatch.setitem(states.KINDS, "step_counter", StepCounterState)  # the recipe's one line
    monkeypatch.setattr(StepCounter, "count", 7)
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path, model=model) as mgr:
        mgr.save(1)
    StepCounter.count = 0  # a fresh process
    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2)) as mgr:
        assert mgr.load() == 1
    assert StepCounter.count == 7
