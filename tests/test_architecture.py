"""The module graph the architecture promises (issue 16): no stage imports another stage, the policy and the
artifact contract are leaves, and no import cycle, counting imports inside functions (they still couple)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"emgate": ROOT / "components" / "emgate", "emgate_pipelines": ROOT / "pipelines"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """Module -> the first-party modules it imports (module level or in a function; TYPE_CHECKING blocks left out)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                assert node.level == 0, f"{path}: relative import"
                base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


GRAPH = import_graph()


def test_the_graph_sees_imports_inside_functions() -> None:
    # judge_answers imports the floor's questions at module level, fine_tune its model source inside a function
    assert "emgate.floor" in GRAPH["emgate.stages.judge"]
    assert "emgate.assets" in GRAPH["emgate.stages.finetune"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("stage", sorted(m for m in GRAPH if m.startswith("emgate.stages.")))
def test_no_stage_imports_another_stage(stage: str) -> None:
    others = sorted(m for m in GRAPH[stage] if m.startswith("emgate.stages."))
    assert not others, f"{stage} imports {others}: what stages share goes in emgate.contract (files) or a leaf module"


def test_no_import_cycle() -> None:
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH) or [])}"


def test_the_policy_is_plain_data_and_the_contract_a_leaf() -> None:
    for leaf in ("emgate.policy", "emgate.contract", "emgate.statistics"):
        assert not any(m.startswith(("emgate.stages", "emgate.kfp", "emgate_pipelines")) for m in GRAPH[leaf]), leaf
    source = (PACKAGES["emgate"] / "policy.py").read_text()
    assert "mlflow" not in {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                            if isinstance(node, ast.Import | ast.ImportFrom)
                            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}


def test_artifact_file_names_are_spelled_only_in_the_contract() -> None:
    names = ('"report.json"', '"answers.jsonl"', '"scores.jsonl"', '"summary.json"', '"train_report.json"',
             '"manifest.json"', '"decisions.json"', '"external_adapters.json"', '"qualification.json"')
    spelled = [f"{path.relative_to(ROOT)}: {n}" for module, path in _modules().items() if module != "emgate.contract"
               for n in names if n in path.read_text(encoding="utf-8")]
    assert not spelled, spelled


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in tests/factories.py (and conftest.py), so test modules stay independent."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("tests.test_")]
    assert not offenders, offenders
