"""The one-way dependency rule of docs/architecture.md, checked from the imports themselves.

Every ``import`` in ``vpr_ros/`` is read with ``ast`` (module level and inside functions alike:
a lazy import is still a dependency) and reduced to an edge between top-level units
(``runtime``, ``models``, ``errors``, ...). The rules are stated per unit, not per file, so a
module or a package someone adds is covered without touching this test:

* ROS client libraries (rclpy, generated message/service packages, rosidl, rmw) are imported
  only under ``vpr_ros/ros/``.
* Layers, top to bottom: ros -> slam -> localization -> mapdb -> runtime -> export -> models.
  A layer
  reaches (directly or through any other unit, declared here or not) only the layers below it
  and the base units; never a layer above it, an offline tool or an application.
  ``export`` sits below ``runtime``: it turns models into artifacts (ONNX, TensorRT engines)
  and defines their self-description; the runtime reads those and exports a model directory
  on demand. export itself needs nothing but models.
* Offline tools (train, eval, and the dataset readers in datasets/) use models and anything
  below ros/, never ros/ or an application.
* Base units (single top-level modules such as errors) import only base units.
* Applications (cli, bench, demo) may use everything.
* The unit graph has no cycle, apart from the deliberate exceptions in ``EXCEPTIONS``, each
  named by module with its reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import pytest

import vpr_ros

PACKAGE_DIR = Path(vpr_ros.__file__).resolve().parent

#: Top to bottom. A unit may depend only on units after it in this tuple (and on base units).
LAYERS = ("ros", "slam", "localization", "mapdb", "runtime", "export", "models")
#: Offline tools: may use every layer below ros (the dataset readers build mapdb's camera
#: calibrations, so they sit above the layers too).
TOOLS = ("train", "eval", "datasets")
#: Entry points and benchmarks: may use everything.
APPS = ("cli", "bench", "demo")
#: Packages (besides single top-level modules, which are always base) that depend on base
#: units only and may be used by anyone.
BASE_PACKAGES: tuple[str, ...] = ()

#: Module-level exceptions to the rules, each with the reason it is deliberate.
#: (importing module, imported unit or module) -> reason
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("vpr_ros.eval.zoo", "vpr_ros.train"):
        "the model-zoo comparison reads each training recipe to learn its test size",
    ("vpr_ros.eval.zoo_runs", "vpr_ros.train"):
        "the model-zoo comparison trains the recipes it compares (vpr eval zoo) before "
        "evaluating them; training's own validation uses eval's recall, so eval and train "
        "meet here and nowhere else",
    ("vpr_ros.eval.backbone_cache", "vpr_ros.train"):
        "the zoo's held-out backbone features are keyed exactly like training's feature cache "
        "(train.data.cache_key/state_hash), so both reuse one cache",
    ("vpr_ros.runtime.auto_select", "vpr_ros.datasets.nordland"):
        "backend auto checks reduced precisions on real images: the shared Nordland frames, "
        "read by datasets.nordland, which itself needs only base modules (checked below); "
        "imported lazily, and without the data a built-in image set is used",
    ("vpr_ros.resources", "ament_index_python"):
        "on a colcon install the config/ folder is found through ament's share-directory index "
        "(pure Python file lookup, no ROS middleware); guarded, optional",
}

#: Top-level names of ROS client libraries and generated interface packages.
ROS_EXACT = {"rclpy", "rcl", "rmw", "rosidl_runtime_py", "rosidl_parser", "builtin_interfaces",
             "ament_index_python", "launch", "launch_ros", "message_filters", "tf2_ros",
             "cv_bridge"}
ROS_SUFFIXES = ("_msgs", "_srvs", "_interfaces", "_actions")


def is_ros_library(module: str) -> bool:
    top = module.split(".")[0]
    return (top in ROS_EXACT or top.startswith(("rclpy", "rmw_", "rosidl_"))
            or top.endswith(ROS_SUFFIXES))


@dataclass(frozen=True)
class Import:
    module: str   # the importing module, e.g. vpr_ros.runtime.encoder
    target: str   # the imported module, e.g. vpr_ros.models.model_dir or torch.nn
    line: int

    def where(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(root: Path) -> list[Import]:
    """Every import of every module under ``root`` (a package directory named vpr_ros)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [Import(mod, a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    # `from vpr_ros import errors` imports the submodule vpr_ros.errors
                    sub = f"{src}.{alias.name}"
                    found.append(Import(mod, sub if _exists(root, sub) else src, node.lineno))
    return found


def _exists(root: Path, dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != root.name:
        return False
    p = root.joinpath(*parts[1:])
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def unit_of(module: str, root: Path) -> Optional[str]:
    """``runtime`` for vpr_ros.runtime.x, ``errors`` for vpr_ros.errors; None outside the
    package or for the package's own ``__init__``."""
    parts = module.split(".")
    if parts[0] != root.name or len(parts) < 2:
        return None
    return parts[1]


def is_base(unit: str, root: Path) -> bool:
    return unit in BASE_PACKAGES or (root / f"{unit}.py").is_file()


def _excepted(imp: Import) -> Optional[str]:
    for (mod, target), reason in EXCEPTIONS.items():
        if imp.module == mod and (imp.target == target or imp.target.startswith(target + ".")):
            return reason
    return None


def unit_edges(imports: Iterable[Import], root: Path) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in imports:
        if _excepted(imp):
            continue
        a, b = unit_of(imp.module, root), unit_of(imp.target, root)
        if a and b and a != b:
            edges.setdefault((a, b), []).append(imp)
    return edges


def allowed(unit: str, root: Path) -> Optional[set[str]]:
    """The declared units ``unit`` may reach, or None for no limit (applications)."""
    units = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    units |= {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    base = {u for u in units if is_base(u, root)}
    if unit in LAYERS:
        return set(LAYERS[LAYERS.index(unit) + 1:]) | base
    if unit in TOOLS:
        return units - {"ros"} - set(APPS)
    if is_base(unit, root):
        return base
    return None  # applications and units not declared here


def reach(edges: dict[tuple[str, str], list[Import]], start: str
          ) -> dict[str, list[Import]]:
    """Every unit reachable from ``start``, with the chain of imports that gets there."""
    out: dict[str, list[Import]] = {}
    todo = [(start, [])]
    while todo:
        unit, path = todo.pop()
        for (a, b), imps in edges.items():
            if a == unit and b not in out and b != start:
                out[b] = path + [imps[0]]
                todo.append((b, out[b]))
    return out


def declared(unit: str, root: Path) -> bool:
    return unit in LAYERS or unit in TOOLS or unit in APPS or is_base(unit, root)


# -- the rules, as functions of a scanned tree (so they can be checked on a fabricated one) ---

def ros_outside_ros(imports: Iterable[Import], root: Path) -> list[str]:
    return [imp.where() for imp in imports
            if is_ros_library(imp.target) and unit_of(imp.module, root) != "ros"
            and not _excepted(imp)]


def layering_violations(imports: list[Import], root: Path) -> list[str]:
    edges = unit_edges(imports, root)
    units = {a for a, _ in edges} | {b for _, b in edges}
    bad = []
    for unit in sorted(units):
        limit = allowed(unit, root)
        if limit is None:
            continue
        for target, chain in sorted(reach(edges, unit).items()):
            if declared(target, root) and target not in limit:
                bad.append(f"{unit} must not depend on {target}: "
                           + " -> ".join(i.where() for i in chain))
    return bad


def cycles(imports: list[Import], root: Path) -> list[str]:
    """Every unit edge that lies on a cycle, with the way back."""
    edges = unit_edges(imports, root)
    bad = []
    for a, b in sorted(edges):
        back = reach(edges, b).get(a)
        if back is not None:
            bad.append(f"cycle {a} -> {b} -> ... -> {a}: {edges[(a, b)][0].where()}; back: "
                       + " -> ".join(i.where() for i in back))
    return bad


# -- the real package ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return scan(PACKAGE_DIR)


def test_only_ros_imports_ros_client_libraries(imports) -> None:
    assert ros_outside_ros(imports, PACKAGE_DIR) == []
    assert any(unit_of(i.module, PACKAGE_DIR) == "ros" and i.target.startswith("rclpy")
               for i in imports), "the scan must see ros/'s rclpy imports"


def test_layers_depend_only_downwards(imports) -> None:
    assert layering_violations(imports, PACKAGE_DIR) == []


def test_unit_graph_has_no_cycle(imports) -> None:
    assert cycles(imports, PACKAGE_DIR) == []


def test_offline_tools_use_models(imports) -> None:
    edges = unit_edges(imports, PACKAGE_DIR)
    for tool in ("train", "eval", "export"):
        assert (tool, "models") in edges, f"{tool} no longer imports models?"
    assert {b for a, b in edges if a == "export"} <= {"models"} | {
        u for _, u in edges if is_base(u, PACKAGE_DIR)}


def test_exception_targets_inside_the_package_need_only_base_modules(imports) -> None:
    """A layer may reach past the rule only into a module that drags nothing else in."""
    for (_, target) in EXCEPTIONS:
        unit = unit_of(target, PACKAGE_DIR)
        if unit is None or len(target.split(".")) < 3:
            continue
        deps = {unit_of(i.target, PACKAGE_DIR) for i in imports if i.module == target}
        deps.discard(None)
        assert all(is_base(d, PACKAGE_DIR) for d in deps), (target, deps)


def test_every_exception_is_still_needed(imports) -> None:
    """An exception nobody uses any more is removed, so the list stays the truth."""
    for (mod, target) in EXCEPTIONS:
        assert any(i.module == mod and (i.target == target or i.target.startswith(target + "."))
                   for i in imports), f"exception {mod} -> {target} is unused; remove it"


# -- the rules catch what they promise to (a fabricated package) -----------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "vpr_ros"
    for rel, text in {"__init__.py": "", "errors.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:
            init = pkg / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        path.write_text(text)
    return pkg


def test_the_rules_fail_on_violations(tmp_path: Path) -> None:
    pkg = _tree(tmp_path, {
        "ros/node.py": "import rclpy\nfrom vpr_ros.localization import decide\n",
        "localization/decide.py": "def f():\n    from sensor_msgs.msg import Image\n",
        "mapdb/place_map.py": "from vpr_ros.runtime import encoder\n",
        "runtime/encoder.py": "from vpr_ros.mapdb.place_map import X\n",      # upwards + cycle
        "export/onnx_export.py": "from vpr_ros.runtime.encoder import E\n",   # export above runtime
        "models/vpr_model.py": "from vpr_ros import helpers\n",
        "helpers/__init__.py": "from .inner import y\n",
        "helpers/inner.py": "from vpr_ros.eval import recall\n",             # models -> eval, via
        "eval/recall.py": "from vpr_ros.models import vpr_model\n",          # an undeclared unit
        "train/run.py": "import vpr_ros.ros.node\n",                           # tool -> ros
        "cpu_cores.py": "from vpr_ros.runtime.encoder import E\n",          # base -> layer
        "cli/main.py": "import vpr_ros.ros.node, vpr_ros.train.run\n",         # fine: an app
    })
    found = scan(pkg)
    assert ros_outside_ros(found, pkg) == [
        "vpr_ros.localization.decide:2 imports sensor_msgs.msg"]
    bad = "\n".join(layering_violations(found, pkg))
    for rule in ("runtime must not depend on mapdb", "export must not depend on runtime",
                 "models must not depend on eval", "train must not depend on ros",
                 "cpu_cores must not depend on runtime"):
        assert rule in bad, rule
    assert "cli must not" not in bad and "ros must not" not in bad
    assert "vpr_ros.helpers.inner:1 imports vpr_ros.eval.recall" in bad  # the chain is named
    loops = "\n".join(cycles(found, pkg))
    assert "mapdb -> runtime" in loops or "runtime -> mapdb" in loops


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    pkg = _tree(tmp_path, {
        "ros/node.py": "import rclpy\nfrom vpr_ros.mapdb import place_map\n",
        "mapdb/place_map.py": "from vpr_ros.runtime.encoder import E\nfrom vpr_ros import errors\n",
        "runtime/encoder.py": "from vpr_ros.export import artifact\n",
        "export/artifact.py": "from vpr_ros.models import m\n",
        "models/m.py": "import torch\n",
        "newthing/x.py": "from vpr_ros.models import m\n",  # undeclared: free, checked via reach
    })
    found = scan(pkg)
    assert ros_outside_ros(found, pkg) == []
    assert layering_violations(found, pkg) == []
    assert cycles(found, pkg) == []
