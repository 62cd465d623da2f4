"""The import layers of design.md, checked on the source: a violation names the file, line and import.

    rlhf_ray.cli                           on top; nothing imports it
    rlhf_ray.driver, recipes, bench        know both sides
    actors/          learners/             import only the core; never each other
    rlhf_ray core                          imports none of the above
    rlhf_ray.algorithms                    pure tensor functions: no ray, deepspeed or vllm
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("rlhf_ray.driver", "rlhf_ray.recipes", "rlhf_ray.bench", "rlhf_ray.cli")
SIDES = ("actors", "learners")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, those inside functions included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks a rule, as 'file:line: module imports name (rule)'."""
    bad: dict[tuple[Path, int], str] = {}  # one message per import statement
    for path in sorted([*root.glob("rlhf_ray/**/*.py"), *root.glob("actors/**/*.py"), *root.glob("learners/**/*.py")]):
        module = _module_name(path, root)
        for line, name in _imports(path, module):
            where = f"{path.relative_to(root)}:{line}: {module} imports {name}"
            if _within(module, SIDES):
                other = "learners" if module.split(".")[0] == "actors" else "actors"
                if _within(name, UPPER + (other,)):
                    bad.setdefault((path, line), f"{where} (actors and learners import only the core)")
            elif _within(module, ("rlhf_ray",)) and not _within(module, UPPER):
                if _within(name, UPPER + SIDES):
                    bad.setdefault((path, line), f"{where} (the core imports neither actors, learners nor the driver side)")
            elif _within(name, ("rlhf_ray.cli",)) and module != "rlhf_ray.cli":
                bad.setdefault((path, line), f"{where} (nothing imports the CLI)")
            if _within(module, ("rlhf_ray.algorithms",)) and _within(name, ("ray", "deepspeed", "vllm")):
                bad.setdefault((path, line), f"{where} (algorithms are pure tensor functions)")
    return list(bad.values())


def test_imports_follow_the_layers() -> None:
    assert layer_violations() == []


def test_the_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    planted = {
        "rlhf_ray/config/schema.py": "from rlhf_ray.driver.loop import train\n",
        "rlhf_ray/data/load.py": "from ..recipes import synthetic\n",
        "rlhf_ray/algorithms/kl.py": "def f():\n    import ray\n",
        "actors/pool.py": "import learners.group\n",
        "learners/worker.py": "from actors import rollout_actor\n",
        "rlhf_ray/bench/main.py": "from rlhf_ray.cli import main\n",
        "rlhf_ray/driver/loop.py": "from actors.rollout_pool import RolloutPool\nimport learners\n",
    }
    for rel, text in planted.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = layer_violations(tmp_path)
    assert len(found) == 6, found
    for rel in ("config/schema.py", "data/load.py", "algorithms/kl.py", "actors/pool.py", "learners/worker.py", "bench/main.py"):
        assert any(rel in f for f in found), (rel, found)
    assert not any("driver/loop.py" in f for f in found)  # the driver knows both sides
