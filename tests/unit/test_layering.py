"""The package layering of relay/ and listeners/, read from the source with ``ast`` (nothing is imported).

An import counts at module level and inside functions, except under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import sqlite3
import subprocess
import sys
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("relay", "listeners")
HEAVY = ("pydantic", "typer", "aio_pika", "aiormq", "aiosmtplib", "jinja2",
         "relay.config.models", "relay.engines.sqlite_store", "relay.engines.amqp", "relay.daemon")


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    module_level: bool
    text: str

    def __str__(self) -> str:
        return f"{self.source} ({module_path(self.source)}:{self.line}: `{self.text}`)"


def is_ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@cache
def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def module_path(name: str) -> str:
    return str(module_files()[name].relative_to(ROOT))


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.depth, self.imports = module, 0, list[Import]()
        self.package = module if is_package else module.rpartition(".")[0]

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        for child in node.orelse if is_type_checking(node.test) else [node.test, *node.body, *node.orelse]:
            self.visit(child)

    def add(self, node: ast.stmt, target: str) -> None:
        text = ast.unparse(node)
        self.imports.append(Import(self.module, target, node.lineno, self.depth == 0, text))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self.add(node, submodule if submodule in module_files() else base)


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = module_files()[module]
    collector = Collector(module, path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return tuple(collector.imports)


def edges(module: str, module_level_only: bool = False) -> list[Import]:
    return [i for i in imports_of(module) if i.module_level or not module_level_only]


def reachable(start: str) -> dict[str, list[Import]]:
    """Everything importing ``start`` loads (module level), with the chain of imports leading to it.

    Loading ``relay.a.b`` also runs the ``relay.a`` package's ``__init__``."""
    chains: dict[str, list[Import]] = {start: []}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        parent = current.rpartition(".")[0]
        implied = [Import(current, parent, 0, True, f"package of {current}")] if parent in module_files() else []
        for edge in [*edges(current, module_level_only=True), *implied]:
            if edge.target not in chains:
                chains[edge.target] = [*chains[current], edge]
                if edge.target in module_files():
                    queue.append(edge.target)
    return chains


def chain_text(chain: list[Import]) -> str:
    return " -> ".join(str(edge) for edge in chain) + (f" -> {chain[-1].target}" if chain else "")


def test_no_import_cycles() -> None:
    graph = {m: {i.target: i for i in edges(m) if i.target in module_files() and i.target != m}
             for m in module_files()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph[node]:
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            components.append(component)

    for module in sorted(graph):
        if module not in index:
            strongconnect(module)
    cycles = []
    for component in (c for c in components if len(c) > 1):
        start = min(component)
        paths: dict[str, list[Import]] = {start: []}
        queue = deque([start])
        while queue:
            current = queue.popleft()
            for succ, edge in sorted(graph[current].items()):
                if succ == start:
                    chain = [*paths[current], edge]
                    cycles.append(" -> ".join([start, *(e.target for e in chain)]) + "\n    via "
                                  + "\n    via ".join(map(str, chain)))
                    queue.clear()
                    break
                if succ in component and succ not in paths:
                    paths[succ] = [*paths[current], edge]
                    queue.append(succ)
    assert not cycles, "import cycles (imports inside functions count):\n  " + "\n  ".join(cycles)


def test_contract_imports_only_standard_library() -> None:
    allowed = ("relay.contract", "relay.errors", "relay.timing")
    bad = [f"{i} imports {i.target}" for m in module_files() if within(m, "relay.contract") for i in edges(m)
           if i.target.split(".")[0] not in sys.stdlib_module_names and not any(within(i.target, a) for a in allowed)]
    assert not bad, "relay.contract may import only the standard library, relay.contract, relay.errors, " \
                    "relay.timing:\n  " + "\n  ".join(bad)


def test_errors_and_timing_import_nothing_of_ours() -> None:
    bad = [f"{i} imports {i.target}" for m in ("relay.errors", "relay.timing") for i in edges(m) if is_ours(i.target)]
    assert not bad, "relay.errors and relay.timing must import nothing of ours:\n  " + "\n  ".join(bad)


def test_engine_interface_loads_no_implementation() -> None:
    implementations = {m for m in module_files() if within(m, "relay.engines")} - {"relay.engines",
                                                                                  "relay.engines.base"}
    bad = [f"{start} loads {target}: {chain_text(chain)}" for start in ("relay.engines", "relay.engines.base")
           for target, chain in reachable(start).items()
           if target in implementations or target.split(".")[0] in ("aio_pika", "aiormq")]
    assert not bad, "the engine interface must load no implementation at module level:\n  " + "\n  ".join(bad)


def test_only_cli_imports_listeners() -> None:
    bad = [f"{i} imports {i.target}" for m in module_files() if within(m, "relay") and not within(m, "relay.cli")
           for i in edges(m) if within(i.target, "listeners")]
    assert not bad, "only relay.cli may import listeners.*:\n  " + "\n  ".join(bad)


def test_delivery_plan_and_outcome_load_no_aiosmtplib() -> None:
    bad = [f"{start} loads {target}: {chain_text(chain)}" for start in ("relay.delivery.plan", "relay.delivery.outcome")
           for target, chain in reachable(start).items() if within(target, "aiosmtplib")]
    assert not bad, "the pure delivery modules must not load aiosmtplib (module level, transitively):\n  " \
                    + "\n  ".join(bad)


def test_no_file_shadows_a_standard_library_module() -> None:
    # Anywhere in the tree: a script run from its folder (python relay/x/y.py) puts that folder
    # first on sys.path, and relay/inspect.py once broke `python relay/sendmail.py` that way.
    bad = [f"{path.relative_to(ROOT)} shadows the standard library's `{path.stem}`" for path in module_files().values()
           if path.stem in sys.stdlib_module_names and not path.stem.startswith("__")]
    assert not bad, "rename:\n  " + "\n  ".join(bad)


def test_no_test_doubles_in_product_code() -> None:
    bad = [f"{module_path(m)}:{node.lineno}: class {node.name}" for m, path in module_files().items()
           for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
           if isinstance(node, ast.ClassDef) and node.name.startswith(("Recording", "Fake", "Stub"))]
    assert not bad, "test doubles belong in tests/ (e.g. tests/doubles.py):\n  " + "\n  ".join(bad)


def test_sendmail_fast_path_is_light(tmp_path: Path) -> None:
    queue_db = tmp_path / "q" / "queue.db"
    config = tmp_path / "opsrelay.toml"
    config.write_text(f'[broker]\nurl = "sqlite:///{queue_db}"\n\n'
                      '[smtp]\nhost = "localhost"\nsecurity = "none"\nport = 2525\nfrom = "a@example.com"\n')
    message = b"Subject: layering\nFrom: cron@example.com\n\nhello\n"
    script = (f"import io, sys\nfrom relay.sendmail.main import run\n"
              f"code = run(['sendmail', '-i', 'root@example.com'], io.BytesIO({message!r}), sys.stderr)\n"
              f"print(sorted(sys.modules))\nsys.exit(code)\n")
    env = {"PATH": "/usr/bin:/bin", "OPSRELAY_CONFIG": str(config), "HOME": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_STATE_HOME": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"sendmail exited {done.returncode}:\n{done.stderr}"
    loaded: list[str] = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    heavy = sorted(m for m in loaded if any(within(m, h) for h in HEAVY))
    assert not heavy, f"the sendmail fast path loaded {heavy}"
    with closing(sqlite3.connect(queue_db)) as db:
        (rows,) = db.execute("SELECT count(*) FROM messages").fetchone()
    assert rows == 1, f"{queue_db} holds {rows} messages, expected the one submitted"
