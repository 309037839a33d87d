"""The seams between modules: no import cycles and nothing importing upward, architecture paper
names declared at registration, RUNDIR paths from one place."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nodulekit"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the nodulekit modules it imports, at the top or inside a function (a lazy import
    is still a dependency), read from the source without importing anything."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found = {resolve(t) for t in targets if t.split(".")[0] == "nodulekit"}
            graph[name] |= {t for t in found if t and t != name}
    return graph


def _own_package(a: str, b: str) -> bool:
    """A package and one of its own modules (its __init__ registering them, they using its base types)."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between modules (not counting a package with its own modules), or None."""
    edges = {m: {t for t in targets if not _own_package(m, t)} for m, targets in graph.items()}
    try:
        list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The check below can fail: a lazy import closing a loop between two modules is found."""
    pkg = tmp_path / "nodulekit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from nodulekit.sub import a\n")  # a package and its module: allowed
    (pkg / "sub" / "a.py").write_text("from nodulekit.sub import helper\nimport nodulekit.b\n")
    (pkg / "b.py").write_text("def f():\n    from nodulekit.sub.a import x\n")
    graph = import_graph(pkg)
    assert graph["nodulekit.b"] == {"nodulekit.sub.a"} and "nodulekit.b" in graph["nodulekit.sub.a"]
    assert set(cycle(graph)) == {"nodulekit.b", "nodulekit.sub.a"}
    (pkg / "b.py").write_text("X = 1\n")
    assert cycle(import_graph(pkg)) is None


def test_no_import_cycles_among_nodulekit_modules():
    assert cycle(import_graph()) is None


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("nodulekit.run", "nodulekit.training"),  # a RUNDIR is read without the training code
        ("nodulekit.concurrent_folds", "nodulekit.training"),  # the batched step is used by training
        ("nodulekit.maps", "nodulekit.training"),
        ("nodulekit.engines", "nodulekit.training"),
        ("nodulekit.artifacts", "nodulekit.datasets"),  # datasets are one kind of artifact
        ("nodulekit.train_config", "nodulekit.training"),
    ],
)
def test_nothing_imports_upward(lower, upper):
    graph = import_graph()
    reach, todo = set(), [lower]
    while todo:  # everything ``lower`` imports, directly or not
        for target in graph[todo.pop()] - reach:
            reach.add(target)
            todo.append(target)
    assert upper not in reach


def test_only_the_cli_and_the_demo_import_training_or_the_cli():
    graph = import_graph()
    training = {m for m, targets in graph.items() if "nodulekit.training" in targets}
    cli = {m for m, targets in graph.items() if any(t.startswith("nodulekit.cli") for t in targets)}
    assert training <= {"nodulekit.cli.train", "nodulekit.demo"}, training
    assert {m for m in cli if not m.startswith("nodulekit.cli")} <= {"nodulekit.__main__"}, cli


def test_train_config_is_light():
    """The CLI reads TrainConfig's defaults at start-up: its module imports no numpy, torch or h5py."""
    assert graph_imports(PACKAGE / "train_config.py") <= {"__future__", "math", "dataclasses", "typing", "nodulekit"}


def graph_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


# --------------------------------------------------------------------------- paper names


def test_paper_names_are_declared_at_registration():
    """Table 2's row names (the paper's), for our registry names and their aliases."""
    from nodulekit.models.registry import model_spec, paper_name

    table2 = {"hesam": "Ours-HESAM", "sam": "Ours-SAM", "cam": "Ours-CAM", "baseline": "Baseline",
              "resnet18": "ResNet18", "resnet34": "ResNet34", "vgg16": "VGG16", "densenet121": "DenseNet121",
              "resnet18-sam": "ResNet18-SAM", "vgg16-cam": "VGG16-CAM", "densenet121-sam": "DenseNet121-SAM",
              "pn-samp": "PN-SAMP", "sag-c": "SAG-C", "ours-hesam": "Ours-HESAM", "ours-cam": "Ours-CAM"}  # fmt: skip
    for arch, name in table2.items():
        assert paper_name(arch) == name and model_spec(arch).paper_name == name
    assert paper_name("u-sam") == "u-sam"  # Table 4's ablation: no Table 2 name, shown as it is
    assert paper_name("an-architecture-since-removed") == "an-architecture-since-removed"


def test_a_new_architecture_declares_its_paper_name_in_one_place():
    from nodulekit.evaluation import RunResult
    from nodulekit.models.registry import _REGISTRY, register_model

    @register_model("seam-test-net", "a test architecture", paper_name="Seam-Net")
    def factory(in_channels, num_classes=2, *, base_width=4):
        raise NotImplementedError

    try:
        assert RunResult(Path("r"), {"arch": "seam-test-net"}).method == "Seam-Net"
    finally:
        _REGISTRY.pop("seam-test-net")


# --------------------------------------------------------------------------- RUNDIR paths


def test_fold_state_paths_are_run_paths(tmp_path):
    """Training's checkpoint and result paths are the ones every reader of a RUNDIR uses."""
    from conftest import write_tiny_dataset

    from nodulekit import training as T
    from nodulekit.run import Run, RunPaths

    ds = write_tiny_dataset(tmp_path / "d.h5", n=40, channels=3, folds=5)
    cfg = T.TrainConfig(arch="cam", model_options={"base_width": 4}, epochs=1, device="cpu")
    T.train(ds, tmp_path / "run", cfg, folds=[2], progress=False)
    ctx = T.train_context(T.load_dataset(ds), cfg, tmp_path / "run")
    state = T.new_fold_state(ctx, 2)
    run = Run(tmp_path / "run")
    assert state.checkpoint_path == run.checkpoint_path(2) == RunPaths(tmp_path / "run").checkpoint_path(2)
    assert state.result_path == run.result_path(2) and run.result_path(2).exists()
    assert run.fold_status(2) == "finished"
