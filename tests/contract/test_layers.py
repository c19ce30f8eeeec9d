"""The package's layers: a module imports only from its own layer and the layers below it (LAYERS).

Every import in src/histotransfer counts, also those inside functions and under TYPE_CHECKING: a lazy
import is still a dependency (it only defers the cost, or hides a cycle until run time).
"""

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = "histotransfer"
ROOT = REPO / "src" / PACKAGE

# Lowest first. Subpackages by folder name, modules at the package root by file name; every one is named
# (a test fails on a file of the package that no layer names).
LAYERS: list[tuple[str, ...]] = [
    ("core", "__init__.py"),  # the config schema, the id grammar, errors, processes
    ("io",),  # files, the data contract, the per-slide runner and the run's lifecycle
    ("wsi",),  # slides and tiles
    ("plots.py",),  # every figure; heatmaps draw over slide thumbnails (wsi), mil and deploy draw
    ("features",),  # encoders and patch features
    ("mil",),  # attention-MIL on the features
    ("cka", "finetune"),  # comparing and retraining encoders
    ("deploy",),  # ONNX bundles and the torch-free predict
    ("report",),  # what reads a whole study
    ("stages",),  # the pipeline's steps
    ("cli", "__main__.py"),  # the entry point (`python -m histotransfer`)
]
ORDER = "\n".join(f"  {i}. {', '.join(names)}" for i, names in enumerate(LAYERS))


def _layer_of(module: str) -> int | None:
    """The layer of a dotted name in the package; None when no file of the package has that name."""
    parts = module.split(".")[1:]
    if not parts:
        return 0  # the package's own __init__ (__version__)
    if (ROOT / parts[0]).is_dir():
        key = parts[0]
    elif (ROOT / f"{parts[0]}.py").is_file():
        key = f"{parts[0]}.py"
    else:
        return None
    found = [i for i, names in enumerate(LAYERS) if key in names]
    return found[0] if found else None


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The package's modules (or their attributes) one import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: from the module's own package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        origin = ".".join([*base, node.module] if node.module else base)
    else:
        origin = node.module or ""
    if origin == PACKAGE:  # `from histotransfer import stages, lineage`; `__version__` is the package's
        names = [f"{PACKAGE}.{a.name}" for a in node.names]
        return [n if _layer_of(n) is not None else PACKAGE for n in names]
    return [origin]


def upward_imports(rel: str, module: str, is_package: bool, text: str) -> list[str]:
    """``file:line: what`` for each import in ``text`` (module ``module``) of a layer above its own."""
    own = _layer_of(module)
    if own is None:
        return [f"{rel}: its subpackage is in no layer; add it to LAYERS in tests/contract/test_layers.py"]
    found = []
    for node in ast.walk(ast.parse(text, rel)):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for name in _imported(node, module, is_package):
            if name.split(".")[0] != PACKAGE:
                continue
            target = _layer_of(name)
            if target is None:
                found.append(f"{rel}:{node.lineno}: imports {name}, which no file of the package holds")
            elif target > own:
                found.append(
                    f"{rel}:{node.lineno}: {module} (layer {own}: {', '.join(LAYERS[own])}) imports {name} "
                    f"(layer {target}: {', '.join(LAYERS[target])}); a module may import only from its own "
                    "layer and the layers below it"
                )
    return found


def _modules() -> list[tuple[str, str, bool, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        out.append((path.relative_to(ROOT.parents[1]).as_posix(), module, is_package, path))
    return out


def test_no_module_imports_from_a_layer_above_its_own():
    modules = _modules()
    assert len(modules) > 50, f"only {len(modules)} modules found under {ROOT}"
    found = [
        line
        for rel, module, is_package, path in modules
        for line in upward_imports(rel, module, is_package, path.read_text(encoding="utf-8"))
    ]
    assert not found, (
        f"{len(found)} upward import(s):\n" + "\n".join(found) + f"\nthe layers, lowest first:\n{ORDER}"
    )


def test_the_check_sees_lazy_relative_and_package_imports():
    text = (
        "from histotransfer.io import lineage\n"
        "from histotransfer import __version__\n"
        "from histotransfer.wsi import tiling\n"
        "def f():\n"
        "    from histotransfer.deploy.bundle import session\n"
        "    from ..mil import model\n"
        "    import histotransfer.stages\n"
    )
    found = upward_imports("x.py", "histotransfer.features.extraction", False, text)
    assert [f.split(":")[1] for f in found] == ["5", "6", "7"], found
    assert "histotransfer.mil (layer 5: mil)" in found[1]
    assert upward_imports("c.py", "histotransfer.core.runner", False, "from histotransfer.io import atomic")
    assert "in no layer" in upward_imports("y.py", "histotransfer.novel.thing", False, "")[0]
    assert upward_imports("z.py", "histotransfer.core.config", False, "import histotransfer.nothing_here")


def test_every_layer_names_something_that_exists_and_the_root_holds_only_what_they_name():
    named = {name for names in LAYERS for name in names}
    for name in named:
        assert (ROOT / name).exists(), f"LAYERS names {name}, which src/{PACKAGE} does not hold"
    held = {p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert held <= named, (
        f"src/{PACKAGE} holds {sorted(held - named)}, which no layer names: put it in a subpackage"
    )
