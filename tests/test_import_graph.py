"""The import graph of the project's own modules (STYLE.md: imports point one way, no circles, not even through an
import inside a function; the HTTP service never starts Spark).

Every ``.py`` of the packages in ``PACKAGES`` is parsed with ``ast`` (nothing is imported), and every import is
collected, at module level or inside a function or class: ``import a.b`` is ``a.b``; ``from a.b import c`` is the
submodule ``a.b.c`` when there is one, else ``a.b`` (``c`` a function, class or constant of it); relative imports
are resolved against the file's package. An import names a project module when a prefix of it is one, and the
longest such prefix is the edge's target. dags/ is not a package: Airflow puts the folder on ``sys.path``, so
a DAG file's ``import recsys_flows`` is the module ``dags.recsys_flows``. The implicit import of a module's parent
packages is not an edge (a package's ``__init__`` importing its own submodule would otherwise always be a circle).

Asserted: (a) the graph has no cycle; (b) the layering of STYLE.md (``FORBIDDEN``, and the DAG files import only
pipelines, other DAG files, the standard library and airflow); both but for the documented exceptions of
``CYCLE_EXCEPTIONS`` and ``LAYERING_EXCEPTIONS``, each of which must still exist; (c) the checker itself fails on
small synthetic trees; (d) loading the service's bundle for an export never imports pyspark (nor evaluation),
checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "pipelines", "training", "serving", "evaluation", "dags", "bench")
#: Folders on sys.path of their own, whose files import each other as top-level modules.
FLAT_FOLDERS = ("dags",)

#: package -> the project packages it must not import (STYLE.md: features <- pipelines; features <- training <-
#: serving and evaluation; evaluation may import serving, serving never evaluation; dags only orchestrates;
#: nothing but bench imports bench).
FORBIDDEN: dict[str, frozenset[str]] = {
    "features": frozenset({"pipelines", "training", "serving", "evaluation", "dags", "bench"}),
    "training": frozenset({"pipelines", "serving", "evaluation", "dags", "bench"}),
    "serving": frozenset({"evaluation", "pipelines", "dags", "bench"}),
    "evaluation": frozenset({"pipelines", "dags", "bench"}),
    "pipelines": frozenset({"bench"}),
    "dags": frozenset({"features", "training", "serving", "evaluation", "bench"}),
}
#: What a DAG file may import besides the standard library: airflow, pipelines and the other DAG files.
DAG_ALLOWED_TOP = frozenset({"airflow", "pipelines", "dags"})

#: Edges that stay although they break a rule, each with the reason. A fixed one must be removed from here: the
#: test fails on an exception that no longer exists.
#: - closing a cycle (``find_cycles`` runs on the graph without these edges):
CYCLE_EXCEPTIONS: dict[tuple[str, str], str] = {
}
#: - across the layering of ``FORBIDDEN``:
LAYERING_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("serving.export", "pipelines.spark"):
        "the export stage writes each version to the Delta registry gold.item_embeddings and needs a Spark "
        "session; pipelines/spark.py is the one place a session is built (jars, Delta extensions, config), and "
        "features/ may not start Spark. Imported inside main() only, and not with --no-registry.",
}


# ---------------------------------------------------------------------------------------------------- checker
def project_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under each package folder (``__init__.py`` names the
    package)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module, ``None`` when there is none (not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imported_names(path: Path, module: str, modules: dict[str, Path],
                   flat: tuple[str, ...] = FLAT_FOLDERS) -> list[tuple[str, int]]:
    """Every name ``path`` imports, with its line, anywhere in the file: ``import a.b`` gives ``a.b``; ``from a
    import b`` gives ``a.b`` when that is a module of ``modules``, else ``a``. A flat folder's top-level names are
    prefixed with the folder (``recsys_flows`` in dags/ -> ``dags.recsys_flows``) when such a file is there."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    folder = module.split(".")[0]
    local = {p.stem for p in path.parent.glob("*.py")} if folder in flat else set()

    def qualify(name: str) -> str:
        return f"{folder}.{name}" if name.split(".")[0] in local else name

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(qualify(a.name), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                    # relative: from . import x, from ..a import b
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = qualify(node.module)
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, node.lineno)
                    for a in node.names]
    return out


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES,
                 flat: tuple[str, ...] = FLAT_FOLDERS) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of its first import}, the target being the longest prefix of the
    imported name that is a project module. Imports of anything else and of the module itself are dropped."""
    modules = project_modules(root, packages)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        for name, line in imported_names(path, module, modules, flat):
            target = _resolve(name, modules)
            if target is not None and target != module:
                graph[module][target] = min(line, graph[module].get(target, line))
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The cycles of the graph, as chains ``[m0, m1, ..., m0]`` starting at their smallest module, sorted: inside
    each strongly connected component of more than one module (Tarjan 1972), the shortest cycle through each of its
    modules (so every module on a cycle is on one reported); ``[]`` when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:                        # recursion depth <= number of modules (a few hundred)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    chains = set()
    for comp in components:
        members = set(comp)
        for start in comp:                              # the shortest cycle through each member, by BFS
            prev: dict[str, str] = {}
            queue = deque([start])
            while queue:
                v = queue.popleft()
                nxt = [w for w in sorted(graph.get(v, ())) if w in members]
                if start in nxt:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(prev[chain[-1]])
                    cycle = list(reversed(chain))       # start ... v
                    i = cycle.index(min(cycle))         # the same cycle found from another member: one rotation
                    chains.add(tuple(cycle[i:] + cycle[:i]))
                    break
                for w in nxt:
                    if w not in prev:
                        prev[w] = v
                        queue.append(w)
    return [[*c, c[0]] for c in sorted(chains)]


def layering_violations(graph: dict[str, dict[str, int]],
                        forbidden: dict[str, frozenset[str]] = FORBIDDEN) -> dict[tuple[str, str], str]:
    """(module, imported module) -> the rule it breaks, for every edge from a package into one it must not
    import."""
    out = {}
    for src, targets in graph.items():
        banned = forbidden.get(src.split(".")[0], frozenset())
        for dst in targets:
            if dst.split(".")[0] in banned:
                out[(src, dst)] = f"{src.split('.')[0]} must not import {dst.split('.')[0]}"
    return out


def dag_foreign_imports(root: Path, folder: str = "dags") -> list[str]:
    """Imports of the DAG files that are neither standard library, airflow, pipelines nor another DAG file."""
    modules = project_modules(root, (folder,))
    out = []
    for module, path in modules.items():
        for name, line in imported_names(path, module, modules):
            top = name.split(".")[0]
            if top in DAG_ALLOWED_TOP or top in sys.stdlib_module_names:
                continue
            out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return sorted(set(out))


def _chain(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def _without(graph: dict[str, dict[str, int]], edges) -> dict[str, dict[str, int]]:
    return {m: {t: n for t, n in ts.items() if (m, t) not in edges} for m, ts in graph.items()}


# ---------------------------------------------------------------------------------------------------- the project
@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(ROOT)


def test_the_checker_sees_the_whole_project(graph):
    assert {"evaluation.cases", "evaluation.replay", "evaluation.prequential", "serving.publish",
            "serving.index_files", "dags.recsys_flows", "bench.models"} <= set(graph)
    # imports inside functions count, and ``from x import submodule`` is the submodule
    assert "serving.registry" in graph["serving.export"]          # inside _register
    assert "evaluation.prequential" in graph["evaluation.evaluate"]   # from evaluation import prequential
    assert "evaluation" not in graph["evaluation.evaluate"]
    assert "dags.recsys_flows" in graph["dags.evaluate_and_publish"]   # import recsys_flows


def test_no_import_cycles(graph):
    cycles = find_cycles(_without(graph, CYCLE_EXCEPTIONS))
    assert not cycles, "import cycles:\n" + "\n".join(_chain(c, graph) for c in cycles)


def test_layering(graph):
    violations = {e: why for e, why in layering_violations(graph).items() if e not in LAYERING_EXCEPTIONS}
    assert not violations, "imports against STYLE.md's layering:\n" + "\n".join(
        f"{a} -> {b} (line {graph[a][b]}): {why}" for (a, b), why in sorted(violations.items()))


def test_dags_import_only_pipelines_airflow_and_the_standard_library():
    assert dag_foreign_imports(ROOT) == []


def test_every_documented_exception_still_exists(graph):
    stale = [f"{a} -> {b}" for a, b in (*CYCLE_EXCEPTIONS, *LAYERING_EXCEPTIONS) if b not in graph.get(a, {})]
    assert not stale, f"no longer imported, remove from the exceptions: {stale}"
    # a cycle exception must still close a cycle, and a layering exception still cross a layer
    base = _without(graph, CYCLE_EXCEPTIONS)
    for a, b in CYCLE_EXCEPTIONS:
        assert find_cycles({**base, a: {**base[a], b: graph[a][b]}}), f"{a} -> {b} closes no cycle any more"
    assert set(LAYERING_EXCEPTIONS) <= set(layering_violations(graph))


# ---------------------------------------------------------------------------------------------------- the checker
def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",                              # the submodule pkg.b
        "pkg/b.py": "def f():\n    from pkg.c import g\n    return g\n",  # inside a function
        "pkg/c.py": "import pkg.a\n\ndef g():\n    pass\n",
        "pkg/d.py": "from pkg.a import x\n",                            # a name of pkg.a: the module pkg.a
    })
    g = import_graph(root, ("pkg",), flat=())
    assert g["pkg.a"] == {"pkg.b": 1} and g["pkg.b"] == {"pkg.c": 2} and g["pkg.d"] == {"pkg.a": 1}
    assert find_cycles(g) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert _chain(find_cycles(g)[0], g) == "pkg.a (line 1) -> pkg.b (line 2) -> pkg.c (line 1) -> pkg.a"
    assert find_cycles(_without(g, {("pkg.c", "pkg.a")})) == []
    # two cycles sharing a module (one strongly connected component): both reported
    two = {"x": {"y": 1, "z": 2}, "y": {"x": 1}, "z": {"x": 1}}
    assert find_cycles(two) == [["x", "y", "x"], ["x", "z", "x"]]


def test_the_checker_finds_layering_breaks_and_foreign_dag_imports(tmp_path):
    root = _tree(tmp_path, {
        "features/__init__.py": "",
        "features/tables.py": "def f():\n    import serving.app\n",
        "serving/__init__.py": "",
        "serving/app.py": "from features import tables\nfrom ..features.tables import f\n",
        "dags/flows.py": "import json\nimport pipelines.stages\nimport numpy\n",
        "dags/main.py": "from flows import x\nimport airflow\n",
    })
    g = import_graph(root, ("features", "serving", "dags"))
    assert layering_violations(g) == {("features.tables", "serving.app"): "features must not import serving"}
    assert g["dags.main"] == {"dags.flows": 1}
    assert dag_foreign_imports(root) == ["dags/flows.py:3 imports numpy"]
    assert find_cycles(g) == [["features.tables", "serving.app", "features.tables"]]


# ---------------------------------------------------------------------------------------------------- no Spark
def test_loading_an_export_bundle_never_imports_pyspark(tmp_path):
    """The HTTP service's bundle for an export, loaded in a fresh interpreter (this session may have imported
    pyspark already): afterwards no module of pyspark, py4j, evaluation or pipelines is in ``sys.modules``."""
    from test_app import SPEC, _write_deepfm, _write_item2vec, _write_lake

    from features.config import PlatformConfig
    from serving.ann import HnswParams
    from serving.export import run_export

    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    _write_lake(cfg)
    _write_item2vec(cfg, seed=0, version="i2v-1")
    _write_deepfm(cfg, seed=0, version="dfm-1")
    run_export(cfg, HnswParams(m=8, ef_construction=64, ef_search=64), models=("item2vec",))
    script = textwrap.dedent(f"""
        import json, sys
        from features.config import PlatformConfig
        from serving.bundle import BundleSpec, load_bundle
        cfg = PlatformConfig(data_dir={str(cfg.data_dir)!r}, artifacts_dir={str(cfg.artifacts_dir)!r})
        bundle = load_bundle(cfg, BundleSpec(retrieval_model={SPEC.retrieval_model!r}, recent_items=3, per_item=4))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pyspark", "py4j", "evaluation", "pipelines"))
        print(json.dumps({{"version": bundle.retrieval_version, "ranker": bundle.ranker_version,
                           "loaded": loaded}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["version"], result["ranker"]) == ("i2v-1", "dfm-1")     # it did load the export and the ranker
    assert result["loaded"] == []
