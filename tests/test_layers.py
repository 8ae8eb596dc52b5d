"""The dependency order of k2lab's subpackages, enforced: imports point down the pipeline, never back.

Every `import k2lab.X` / `from k2lab.X import ...` (at module level or inside functions: a lazy import is still a
dependency) is read from the source with `ast`. Each subpackage (or top-level module) has a layer; it may import
its own layer's siblings only where listed, and anything in a lower layer. No cycles, and no module imports
another module's underscore names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import k2lab

ROOT = Path(k2lab.__file__).parent

# Lower number = lower in the pipeline. The README's architecture section shows this order.
LAYERS = {
    "config": 0, "runs": 0,
    "model": 1,
    "data": 2, "optim": 2,
    "tokenizer": 3,
    "checkpoint": 4,
    "quant": 5,
    "k2lab": 6,  # the package facade: k2lab.load_model / save_model
    "serve": 7,
    "agents": 8,
    "evals": 9,
    "synth": 10,
    "testing": 11,  # test doubles (scripted OpenAI-compatible server and its scripts for agents and synthesis)
    "train": 12,  # uses the evals' graders and the agents' sandbox as RL rewards, synth's environments
    "report": 13,
    "pipeline": 14,
    "cli": 15,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "k2lab"


def _imports():
    """(source file, source unit, imported module, imported names) for every k2lab import."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        unit = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "k2lab"
        module = ".".join(("k2lab",) + rel.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                yield rel, unit, ".".join(base + ([node.module] if node.module else [])), \
                    [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "k2lab":
                yield rel, unit, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "k2lab":
                        yield rel, unit, a.name, []


def test_every_unit_has_a_layer():
    units = {u for _, u, _, _ in _imports()} | {_unit(m) for _, _, m, _ in _imports()}
    assert not units - set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


def test_imports_point_down_the_pipeline():
    bad = []
    for rel, unit, module, names in _imports():
        target = _unit(module)
        if module == "k2lab" and names:  # `from k2lab import config` names a unit; `import ModelConfig` the facade
            targets = [n if n in LAYERS else "k2lab" for n in names]
        else:
            targets = [target]
        for t in targets:
            if t != unit and LAYERS[t] >= LAYERS[unit]:
                bad.append(f"{rel}: {unit} (layer {LAYERS[unit]}) imports {module} ({t}, layer {LAYERS[t]})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_import_of_underscore_names():
    bad = [f"{rel}: from {module} import {n}" for rel, _, module, names in _imports()
           for n in names if n.startswith("_") and not n.startswith("__")]
    bad += [f"{rel}: import {module}" for rel, _, module, _ in _imports()
            if any(p.startswith("_") and not p.startswith("__") for p in module.split("."))]
    assert not bad, "imports of another module's private names:\n" + "\n".join(bad)
