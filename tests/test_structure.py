"""The package map, enforced by reading every module's imports (ast): one namespace, dependencies pointing one
way, no import cycle, and plain bookkeeping free of grpc and torch. docs/design.md has the map in prose."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level folders installed as qwenpd.<folder> (setup.py), and the qwenpd/ folder itself.
FOLDERS = ("protos", "kernels", "engine", "cache_store", "encoder_service", "prefill_service", "decode_service",
           "clients", "gateway")
GENERIC_TOP_LEVEL = set(FOLDERS)  # names that must never be imported bare

# The shared modules in qwenpd/ that every side may use (no service, no engine among their own imports).
CORE = {"errors", "address", "grpc_status", "grpc_server", "security", "limits", "metrics", "service_config", "units",
        "process", "tokens", "tools"}
# What each part may import, by part name: a folder above, or a module of qwenpd/ ("errors", "handoff", ...).
ALLOWED: dict[str, set[str]] = {
    "protos": set(),
    "kernels": set(),
    # errors: plain domain errors (a lost tensor-parallel rank is UNAVAILABLE); units: flag values; process: ranks
    # tokens: how a token's own bytes are spelled in logprobs (decode knows them, the gateway shows them)
    "engine": {"kernels", "errors", "units", "process", "tokens"},
    "cache_store": {"protos", *CORE},
    "encoder_service": {"engine", "cache_store", "protos", "media", *CORE},
    "prefill_service": {"engine", "kernels", "cache_store", "protos", "handoff", "media", "model_service", *CORE},
    "decode_service": {"engine", "kernels", "cache_store", "protos", "handoff", "model_service", *CORE},
    "clients": {"protos", "errors", "grpc_status", "security", "address", "limits"},
    "gateway": {"clients", "protos", *CORE},
    # shared modules of qwenpd/
    "errors": set(),
    "layout": set(),  # each folder's __init__ calls it first: a folder is never a top-level package
    "units": set(),
    "tokens": set(),
    "tools": {"errors"},  # OpenAI's function tools, checked alike by the gateway and prefill (Chat.tools_json)
    "process": set(),
    "address": set(),
    "metrics": set(),
    "grpc_status": {"errors"},
    "security": {"errors", "grpc_status"},  # grpc_status.with_before wraps its token check
    "limits": {"errors"},
    "service_config": {"limits", "security", "address", "units"},
    "grpc_server": {"errors", "grpc_status", "security", "address", "limits", "service_config"},
    "handoff": {"engine", "protos", "errors"},  # the prefill -> decode contract
    "media": {"engine", "protos", "errors", "limits"},  # an image between the encoder pool and prefill
    "model_service": {"engine", "service_config", "limits", "security", "address"},  # what prefill and decode share
    # entry points and process management: they start everything
    "__init__": set(),
    "cli": {"*"},
    "serve": {"*"},
    "supervisor": {"*"},
}
# Plain bookkeeping: no grpc and no torch among its imports, even indirectly (module level).
BOOKKEEPING = ("qwenpd.cache_store.index", "qwenpd.cache_store.allocator", "qwenpd.prefill_service.queue",
               "qwenpd.prefill_service.prefix_policy", "qwenpd.decode_service.scheduler", "qwenpd.decode_service.policy",
               "qwenpd.clients.routing",
               "qwenpd.clients.chat_output",
               "qwenpd.engine.pages", "qwenpd.engine.engine_config", "qwenpd.errors", "qwenpd.address", "qwenpd.units",
               "qwenpd.process", "qwenpd.tokens", "qwenpd.tools")


@dataclass(frozen=True, slots=True)
class Edge:
    source: str  # module name
    target: str  # module name (internal) or top-level external package
    line: int
    module_level: bool  # executed at import time (not inside a function, not under TYPE_CHECKING)


def module_files() -> dict[str, Path]:
    out = {}
    for folder in ("qwenpd", *FOLDERS):
        root = REPO / folder
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            prefix = ["qwenpd"] if folder == "qwenpd" else ["qwenpd", folder]
            out[".".join(prefix + parts)] = path
    return out


MODULES = module_files()


def _resolve(name: str) -> str:
    """An imported name as the longest known module it names (`qwenpd.engine.sampling.SamplingParams` ->
    `qwenpd.engine.sampling`), or its top-level package when external."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return parts[0]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or \
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"


def edges(module: str) -> Iterator[Edge]:
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"

    def visit(node: ast.AST, module_level: bool) -> Iterator[Edge]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # type-only imports
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Edge(module, _resolve(alias.name), child.lineno, module_level)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = module.split(".")[: len(module.split(".")) - child.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    yield Edge(module, _resolve(f"{base}.{alias.name}" if base else alias.name), child.lineno,
                               module_level)
            else:
                inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                yield from visit(child, inner)

    yield from visit(tree, True)


ALL_EDGES = [e for m in sorted(MODULES) for e in edges(m)]


def part(module: str) -> str:
    """`qwenpd.engine.model` -> "engine"; `qwenpd.errors` -> "errors"; `qwenpd` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def where(e: Edge) -> str:
    return f"{MODULES[e.source].relative_to(REPO)}:{e.line}: {e.source} imports {e.target}"


def test_every_part_has_a_rule() -> None:
    unknown = sorted({part(m) for m in MODULES} - set(ALLOWED))
    assert not unknown, f"parts with no dependency rule in tests/test_structure.py: {unknown}"


def test_no_generic_top_level_imports() -> None:
    bad = [where(e) for e in ALL_EDGES if e.target in GENERIC_TOP_LEVEL]
    assert not bad, "import these as qwenpd.<name>:\n" + "\n".join(bad)


def test_dependencies_point_one_way() -> None:
    bad = []
    for e in ALL_EDGES:
        if not e.target.startswith("qwenpd"):
            continue
        src, dst = part(e.source), part(e.target)
        allowed = ALLOWED[src]
        if src != dst and "*" not in allowed and dst not in allowed and dst != "layout":
            bad.append(where(e))
    assert not bad, "imports against the package map:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in ALL_EDGES:
        if e.module_level and e.target in MODULES and e.target != e.source:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def _closure(module: str) -> set[str]:
    """Everything importing `module` executes: its module-level imports, transitively, with the parent
    packages Python imports on the way (internal modules and external top-level names)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m not in MODULES:
            continue
        parents = [".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")))]
        todo += [p for p in parents if p in MODULES]
        todo += [e.target for e in edges(m) if e.module_level]
    return seen


@pytest.mark.parametrize("module", BOOKKEEPING)
def test_bookkeeping_imports_no_grpc_or_torch(module: str) -> None:
    closure = _closure(module)
    assert not closure & {"grpc", "grpc_status", "grpc_health", "torch"}, \
        f"{module} imports (indirectly) {sorted(closure & {'grpc', 'grpc_status', 'grpc_health', 'torch'})}: " \
        f"via {sorted(m for m in closure if m.startswith('qwenpd'))}"


# The processes that never run the model start without torch: serve all's parent, the gateway, the cache store
# (each was ~1.3 s of CPU and ~190 MB more memory with it).
TORCH_FREE = ("qwenpd.cli", "qwenpd.serve", "qwenpd.supervisor", "qwenpd.gateway.server", "qwenpd.cache_store.server")


@pytest.mark.parametrize("module", TORCH_FREE)
def test_processes_without_a_model_import_no_torch(module: str) -> None:
    closure = _closure(module)
    assert "torch" not in closure, f"{module} imports torch (indirectly) via " \
        f"{sorted(m for m in closure if m.startswith('qwenpd'))}"


def test_serve_all_builds_its_configs_without_torch(tiny_model_dir) -> None:
    """At run time too: serve all's parent builds and checks every child's config without importing torch, with
    the flags whose checks read the checkpoint (neuron cores, tensor parallelism, the MTP head's tensors)."""
    import subprocess
    import sys

    code = f"""
import sys
from qwenpd.supervisor import ServiceSet, config_from_json, config_to_json
s = ServiceSet.build({str(tiny_model_dir)!r}, gateway=True, neuron_cores="0-1", prefill_tp=2, decode_tp=2,
                    num_speculative_tokens=2)
for child in s.children:
    config_from_json(config_to_json(child.config))
print("torch" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_the_rules_can_fail() -> None:
    """The checker itself: a service importing the other, and a client importing the engine, are caught."""
    assert "decode_service" not in ALLOWED["prefill_service"] and "prefill_service" not in ALLOWED["decode_service"]
    assert not {"engine", "prefill_service", "decode_service", "cache_store", "kernels"} & ALLOWED["clients"]
    assert part("qwenpd.engine.model") == "engine" and _resolve("qwenpd.engine.sampling.SamplingParams") == \
        "qwenpd.engine.sampling"
    fake = Edge("qwenpd.clients.client", "qwenpd.engine.engine", 1, True)
    assert part(fake.target) not in ALLOWED[part(fake.source)]
