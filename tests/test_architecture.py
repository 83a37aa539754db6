"""The import graph points one way (docs/architecture.md):

    kuiper.v1 <- kuiper_client <- kuiper_serve.common <- tokenizer_service, inference_service
              <- kuiper_serve.cli

Read from the source with `ast` (every import, also the ones inside functions and
TYPE_CHECKING blocks), so a lazy import cannot hide a wrong-way edge.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Import name -> source folder, as pyproject.toml installs them.
PACKAGES = {
    "kuiper": REPO / "protos" / "kuiper",
    "kuiper_client": REPO / "clients" / "python" / "kuiper_client",
    "kuiper_serve": REPO / "kuiper_serve",
    "tokenizer_service": REPO / "tokenizer_service",
    "inference_service": REPO / "inference_service",
    "cuda_kernels": REPO / "cuda_kernels",
}

# Layer -> the layers it may import (besides itself). A layer is a top-level package, except
# kuiper_serve, whose two halves sit at opposite ends of the graph.
ALLOWED = {
    "kuiper": set(),
    "cuda_kernels": set(),
    "kuiper_client": {"kuiper"},
    "kuiper_serve": set(),  # the bare kuiper_serve/__init__.py imports nothing
    "kuiper_serve.common": {"kuiper", "kuiper_client"},
    "tokenizer_service": {"kuiper", "kuiper_client", "kuiper_serve.common"},
    # The in-process LLM tokenizes with the tokenizer library (not its server): see EXCEPTIONS.
    "inference_service": {"kuiper", "kuiper_client", "kuiper_serve.common", "cuda_kernels"},
    "kuiper_serve.cli": {
        "kuiper",
        "kuiper_client",
        "kuiper_serve.common",
        "tokenizer_service",
        "inference_service",
        "cuda_kernels",
    },
}
# (importing layer, imported module prefix) pairs allowed across layers though ALLOWED says no.
EXCEPTIONS = {("inference_service", "tokenizer_service.tokenizer")}

# What the Python client may import from outside the standard library: it is its own
# distribution (grpcio + protobuf + the stubs).
CLIENT_THIRD_PARTY = {"grpc", "google", "kuiper", "kuiper_client"}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. "inference_service.engine.engine"
    target: str  # imported module or name, e.g. "inference_service.backends.base"
    where: str  # "path:line", for the failure message

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    for top, root in PACKAGES.items():
        if path.is_relative_to(root):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def source_files() -> list[Path]:
    files = [
        p
        for root in PACKAGES.values()
        for p in sorted(root.rglob("*.py"))
        if "node_modules" not in p.parts
    ]
    assert len(files) > 50, "the package folders moved: update PACKAGES"
    return files


def imports_of(path: Path) -> list[Edge]:
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    edges = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            edges += [Edge(source, alias.name, where) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from pkg import mod` imports pkg.mod: record the finer name too.
            edges.append(Edge(source, module, where))
            edges += [Edge(source, f"{module}.{a.name}", where) for a in node.names]
    return edges


EDGES = [edge for path in source_files() for edge in imports_of(path)]


def layer(module: str) -> str | None:
    """The layer a module belongs to; None for the standard library and third parties."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if top == "kuiper_serve":
        for half in ("kuiper_serve.common", "kuiper_serve.cli"):
            if module == half or module.startswith(half + "."):
                return half
    return top


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def against_layers(edges: list[Edge]) -> list[str]:
    wrong = []
    for edge in edges:
        src, dst = layer(edge.source), layer(edge.target)
        if dst is None or dst == src or dst in ALLOWED[src]:
            continue
        if any(src == s and under(edge.target, t) for s, t in EXCEPTIONS):
            continue
        wrong.append(str(edge))
    return sorted(set(wrong))


def test_layers_import_only_downwards():
    wrong = against_layers(EDGES)
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    "source, target",
    [
        ("kuiper_client.client", "tokenizer_service.auth"),  # the old client -> service edge
        ("kuiper_client.client", "kuiper_serve.common.defaults"),
        ("kuiper_serve.common.auth", "inference_service.server"),
        ("tokenizer_service.server", "inference_service.engine"),
        ("inference_service.server", "tokenizer_service.server"),
        ("inference_service.server", "kuiper_serve.cli.main"),
        ("kuiper.v1.tokenizer_pb2", "kuiper_client"),
    ],
)
def test_a_wrong_way_edge_is_caught(source, target):
    assert against_layers([Edge(source, target, "x.py:1")]) == [
        f"x.py:1: {source} imports {target}"
    ]


def test_allowed_edges_pass():
    edges = [
        Edge("kuiper_serve.cli.up", "inference_service.server", "x.py:1"),
        Edge("inference_service.llm", "tokenizer_service.tokenizer", "x.py:2"),
        Edge("kuiper_serve.common.defaults", "kuiper_client.channel", "x.py:3"),
        Edge("inference_service.server", "grpc", "x.py:4"),
    ]
    assert against_layers(edges) == []


def test_every_module_has_a_layer_with_rules():
    layers = {layer(module_name(p)) for p in source_files()}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)


def test_python_client_needs_only_grpc_protobuf_and_the_stubs():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = [
        str(edge)
        for edge in EDGES
        if layer(edge.source) == "kuiper_client"
        and edge.target.split(".")[0] not in stdlib | CLIENT_THIRD_PARTY
    ]
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_below_the_cli_only_the_channel_opener_comes_from_the_client():
    """common and the services share the client's channel opener and ports (one copy), but
    never build on the client's API: that is the CLI's and the users' side."""
    wrong = [
        str(e)
        for e in EDGES
        if layer(e.source) in ("kuiper_serve.common", "tokenizer_service", "inference_service")
        and under(e.target, "kuiper_client")
        and not under(e.target, "kuiper_client.channel")
    ]
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_nothing_imports_the_cli():
    wrong = [
        str(e)
        for e in EDGES
        if under(e.target, "kuiper_serve.cli") and not under(e.source, "kuiper_serve.cli")
    ]
    assert not wrong, "\n".join(sorted(set(wrong)))


# ---- inside inference_service ---------------------------------------------------------------
def subpackage(module: str) -> str | None:
    """inference_service.engine.engine -> "engine"; top-level modules count as their own node
    (inference_service.server -> "server")."""
    parts = module.split(".")
    if parts[0] != "inference_service" or len(parts) < 2:
        return None
    return parts[1]


def inference_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in EDGES:
        src, dst = subpackage(edge.source), subpackage(edge.target)
        if src and dst and src != dst:
            graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_cycles_between_inference_subpackages():
    cycle = find_cycle(inference_graph())
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_backends_do_not_import_the_engine():
    wrong = [
        str(e)
        for e in EDGES
        if under(e.source, "inference_service.backends")
        and under(e.target, "inference_service.engine")
    ]
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_engine_sees_only_the_backend_protocol():
    wrong = [
        str(e)
        for e in EDGES
        if under(e.source, "inference_service.engine")
        and under(e.target, "inference_service.backends")
        and not under(e.target, "inference_service.backends.base")
    ]
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_rules_see_real_edges():
    """The checks above pass vacuously if the parser finds nothing: make sure it finds edges
    every layout has (the engine uses the backend protocol; the servers use common)."""
    pairs = {(layer(e.source), layer(e.target)) for e in EDGES}
    assert ("tokenizer_service", "kuiper_serve.common") in pairs
    assert ("inference_service", "kuiper_serve.common") in pairs
    assert ("kuiper_serve.cli", "inference_service") in pairs
    assert "engine" in inference_graph()
