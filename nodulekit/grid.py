"""The paper's experiment grid as one workflow: a YAML config, checked and planned here, run by Snakemake.

Tables 2-5 and the maps are a few hundred jobs (18 architectures x 4 datasets x 5 folds
for Table 2 alone), each a ``nodulekit`` subcommand whose inputs and outputs are artifacts:

    build     rois.h5                      -> datasets/<dataset>.h5
    train     datasets/<dataset>.h5        -> runs/<dataset>/seed<s>/<run>/fold<k>/result.h5
    evaluate  the runs of one table        -> reports/<table>/<dataset>-seed<s>/table2.json
    wilcoxon  reference run + others       -> reports/table5/<dataset>-seed<s>.json
    maps      one run per map method       -> maps/<dataset>-seed<s>/<method>.h5
    scores    the maps + dataset           -> maps/<dataset>-seed<s>/scores.csv (and .md, .json)
    figures   the maps + dataset + scores  -> maps/<dataset>-seed<s>/figures/
    grid-report  every report above        -> report.md, report.json

Snakemake (``nodulekit/workflow/Snakefile``) turns that into a DAG and runs it locally
(``--cores N``) or on a cluster through an executor plugin (``--profile``): a failed or
killed job is rerun by rerunning the command, finished artifacts are kept, and an
interrupted training resumes from its checkpoints. This module reads and checks the
config (every architecture, dataset, model option and map method, before any job
starts) and computes the plan both the Snakefile and the final report use.

A run is identified by its dataset, seed, architecture and model options, so a run two
tables share (Table 2's HESAM is Table 3's GMP / GAP and Table 4's U+GMP+RB+SAM) is
trained once.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodulekit.errors import NodulekitError
from nodulekit.train_config import TrainConfig

CONFIG_KEYS = {
    "output",
    "rois",
    "datasets",
    "folds",
    "split_seed",
    "seeds",
    "epochs",
    "train",
    "model_options",
    "bootstrap",
    "table2",
    "ablations",
    "table5",
    "maps",
}
# `train` options a grid may set (the grid itself sets -o, --epochs, --seed and --fold).
TRAIN_KEYS = {
    "batch_size": int,
    "lr": float,
    "momentum": float,
    "weight_decay": float,
    "lr_step": int,
    "select": str,
    "val_fraction": float,
    "device": str,
    "concurrent_folds": bool,
    "threads": int,
    "gpus": int,
}
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._-]+$")


class GridConfigError(NodulekitError):
    """The grid config names something that does not exist or is malformed."""


@dataclass(frozen=True)
class RunSpec:
    """One cross-validated training: an architecture with options, on a dataset, with a seed."""

    arch: str
    options: tuple[tuple[str, Any], ...]  # the options set explicitly (sorted), defaults left out
    dataset: str
    seed: int

    @property
    def name(self) -> str:
        return "+".join([self.arch] + [f"{k}={_text(v)}" for k, v in self.options])

    @property
    def rundir(self) -> str:
        return f"runs/{self.dataset}/seed{self.seed}/{self.name}"


@dataclass
class Table:
    """One table of the final report: rows (label -> run per dataset) evaluated together per dataset."""

    name: str
    title: str
    datasets: list[str]
    rows: dict[str, str]  # row label -> run name (the same run name on every dataset)
    layout: str  # "table2", "table3" (one dataset: accuracy, sensitivity, specificity) or "table4"


@dataclass
class GridPlan:
    config_path: Path
    root: Path  # the output folder; every path below is relative to it
    rois: Path | None
    datasets: dict[str, dict[str, Any]]  # name -> {"channels": C} (built) or {"path": Path} (given)
    folds: int
    split_seed: int
    seeds: list[int]
    epochs: int
    train: dict[str, Any]
    bootstrap: int
    model_options: dict[str, Any] = field(default_factory=dict)  # given to every architecture that takes them
    runs: dict[str, RunSpec] = field(default_factory=dict)  # rundir -> run
    tables: list[Table] = field(default_factory=list)
    sensitivity_dataset: str | None = None
    table5: dict[str, Any] | None = None  # {"reference": run name, "against": [run names], "datasets": [...]}
    maps: dict[str, Any] | None = None  # {"dataset": name, "methods": {method: run name}}

    # -- paths of the artifacts (relative to root) -----------------------------------------
    def dataset_file(self, name: str) -> str:
        given = self.datasets[name].get("path")
        return str(given) if given is not None else f"datasets/{name}.h5"

    def results(self, rundir: str) -> list[str]:
        return [f"{rundir}/fold{k}/result.h5" for k in range(self.folds)]

    def run_for(self, name: str, dataset: str, seed: int) -> RunSpec:
        return self.runs[f"runs/{dataset}/seed{seed}/{name}"]

    def evaluate_report(self, table: str, dataset: str, seed: int) -> str:
        return f"reports/{table}/{dataset}-seed{seed}/table2.json"

    def wilcoxon_report(self, dataset: str, seed: int) -> str:
        return f"reports/table5/{dataset}-seed{seed}.json"

    def maps_dir(self) -> str:
        return f"maps/{self.maps['dataset']}-seed{self.seeds[0]}"

    def label(self, name: str, dataset: str, seed: int) -> str:
        """A run's row label: the paper's name of its architecture, plus the options the grid does not set for all."""
        from nodulekit.models.registry import paper_name

        run = self.run_for(name, dataset, seed)
        own = [f"{k}={_text(v)}" for k, v in run.options if self.model_options.get(k, object()) != v]
        return paper_name(run.arch) + (f" ({', '.join(own)})" if own else "")

    def final_targets(self) -> list[str]:
        return ["report.md", "report.json"]

    def report_inputs(self) -> list[str]:
        """Every artifact the final report reads."""
        files = [self.evaluate_report(t.name, d, s) for t in self.tables for d in t.datasets for s in self.seeds]
        if self.table5:
            files += [self.wilcoxon_report(d, s) for d in self.table5["datasets"] for s in self.seeds]
        if self.maps:
            files += [f"{self.maps_dir()}/scores.csv"]
        return files


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _fail(plan_or_path, where: str, message: str) -> GridConfigError:
    path = plan_or_path.config_path if isinstance(plan_or_path, GridPlan) else plan_or_path
    return GridConfigError(f"{path}: {where}: {message}")


# --------------------------------------------------------------------------- reading the config


def _unique_keys_loader(yaml):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping of a grid config, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise GridConfigError(f"grid config {path} does not exist")
    from nodulekit.textfiles import read_text

    try:
        import yaml
    except ImportError:
        raise NodulekitError("the grid needs the `grid` extra: pip install 'nodulekit[grid]'") from None
    try:
        raw = yaml.load(read_text(path, "grid config"), Loader=_unique_keys_loader(yaml))  # UTF-8, BOM or not
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # a reader error's text has two lines
        raise GridConfigError(f"{path}: {where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise GridConfigError(f"{path}: a grid config is a YAML mapping (key: value lines)")
    unknown = sorted(set(raw) - CONFIG_KEYS)
    if unknown:
        raise GridConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(CONFIG_KEYS))}")
    return raw


def _int(path, where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(path, where, f"must be an integer >= {minimum}, not {value!r}")
    return value


def _names(path, where: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise _fail(path, where, f"must be a name or a non-empty list of names, not {value!r}")
    return items


def _datasets(path: Path, raw: dict) -> tuple[Path | None, dict[str, dict]]:
    from nodulekit.datasets import CHANNEL_CHOICES

    base = path.parent
    rois = Path(base, raw["rois"]).resolve() if raw.get("rois") else None
    spec = raw.get("datasets")
    if not isinstance(spec, dict) or not spec:
        raise _fail(
            path, "datasets", "name at least one dataset, e.g. `d11c: 11` (built from rois) or `d11c: {path: d11c.h5}`"
        )
    out = {}
    for name, value in spec.items():
        if not _SAFE_VALUE.match(str(name)):
            raise _fail(path, f"datasets.{name}", "dataset names may hold letters, digits, '.', '_' and '-' only")
        if isinstance(value, dict) and set(value) == {"path"}:
            given = Path(base, value["path"]).resolve()
            if not given.is_file():
                raise _fail(path, f"datasets.{name}.path", f"{given} does not exist")
            out[str(name)] = {"path": given}
        elif value in CHANNEL_CHOICES and not isinstance(value, bool):
            if rois is None:
                raise _fail(path, f"datasets.{name}", "is built from `rois:`, which the config does not name")
            out[str(name)] = {"channels": int(value)}
        else:
            choices = ", ".join(map(str, CHANNEL_CHOICES))
            raise _fail(
                path, f"datasets.{name}", f"must be a channel count ({choices}) or {{path: FILE}}, not {value!r}"
            )
    if rois is not None and any("channels" in d for d in out.values()) and not rois.is_file():
        raise _fail(path, "rois", f"{rois} does not exist (write it with `nodulekit extract`)")
    return rois, out


def _train_settings(path: Path, raw: dict) -> dict[str, Any]:
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        raise _fail(path, "train", "must be a mapping of `nodulekit train` options")
    for key, value in train.items():
        kind = TRAIN_KEYS.get(key)
        if kind is None:
            raise _fail(path, f"train.{key}", f"unknown option; known: {', '.join(sorted(TRAIN_KEYS))}")
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise _fail(path, f"train.{key}", f"must be {kind.__name__}, not {value!r}")
    from nodulekit.train_config import SELECT_MODES

    if train.get("select", TrainConfig.select) not in SELECT_MODES:
        raise _fail(path, "train.select", f"must be one of {', '.join(SELECT_MODES)}, not {train['select']!r}")
    # The values `train` itself would refuse (lr 0, momentum 1, ...) are refused here, before any job runs.
    given = {k: v for k, v in train.items() if k in TrainConfig.__dataclass_fields__ and k != "device"}
    try:
        TrainConfig(**given).validate()
    except NodulekitError as exc:
        raise _fail(path, "train", str(exc)) from None
    settings = {"threads": 2, "gpus": 0, **train}
    settings.setdefault("concurrent_folds", fastest_fold_layout(settings["gpus"]) == "side_by_side")
    return settings


# How a run's folds trained fastest, as measured (benchmarks/README.md): "one_job_per_fold"
# (each fold its own `train --fold K` job, many at once) or "side_by_side" (one job,
# `--concurrent-folds`). CPU: side by side measured slower than folds in turn. GPU: on an
# H200 one process per fold, 14 at a time, trained 25 full-width folds in 318 s; side by
# side was not measured there (it fell back to folds in turn under bf16 then). Change an
# entry only with a measurement in benchmarks/README.md (benchmarks/gpu_training.py).
FASTEST_FOLD_LAYOUT = {"cpu": "one_job_per_fold", "gpu": "one_job_per_fold"}


def fastest_fold_layout(gpus: int) -> str:
    """The measured fastest way to train a run's folds on a machine with ``gpus`` GPUs (0: CPU only)."""
    return FASTEST_FOLD_LAYOUT["gpu" if gpus > 0 else "cpu"]


# --------------------------------------------------------------------------- runs and tables


def _variant(plan: GridPlan, where: str, value: Any, global_options: dict) -> tuple[str, tuple]:
    """(canonical architecture, explicit options) of an architecture name or ``{arch, options}``."""
    from nodulekit.models.registry import model_spec

    if isinstance(value, str):
        arch, options = value, {}
    elif isinstance(value, dict) and "arch" in value and set(value) <= {"arch", "options"}:
        arch, options = value["arch"], value.get("options") or {}
    else:
        raise _fail(plan, where, f"must be an architecture name or {{arch: NAME, options: {{...}}}}, not {value!r}")
    if not isinstance(options, dict):
        raise _fail(plan, where, f"options must be a mapping, not {options!r}")
    try:
        spec = model_spec(str(arch))
    except NodulekitError as exc:
        raise _fail(plan, where, str(exc)) from None
    merged = {k: v for k, v in global_options.items() if k in spec.defaults} | options
    _check_model(plan, where, spec.alias_of or spec.name, merged)
    explicit = tuple(sorted((k, v) for k, v in merged.items() if v != spec.defaults[k]))
    for key, v in explicit:
        if not _SAFE_VALUE.match(_text(v)):
            raise _fail(plan, where, f"option {key}={v!r}: values may hold letters, digits, '.', '_' and '-' only")
    return spec.alias_of or spec.name, explicit


def _check_model(plan: GridPlan, where: str, arch: str, options: dict):
    """Build the model without memory (meta device): unknown or bad options fail here, not in a job."""
    import torch

    from nodulekit.models import create_model

    try:
        with torch.device("meta"):
            return create_model(arch, 1, **options)
    except NodulekitError as exc:
        raise _fail(plan, where, str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise _fail(plan, where, f"model {arch!r} with options {options}: {exc}") from None


def _add_runs(plan: GridPlan, arch: str, explicit: tuple, datasets: list[str]) -> str:
    """Register the variant's run on each dataset and seed; returns its run name."""
    for dataset in datasets:
        for seed in plan.seeds:
            run = RunSpec(arch, explicit, dataset, seed)
            plan.runs.setdefault(run.rundir, run)
    return RunSpec(arch, explicit, "", 0).name


def _dataset_list(plan: GridPlan, where: str, value: Any) -> list[str]:
    names = list(plan.datasets) if value is None else _names(plan.config_path, where, value)
    for name in names:
        if name not in plan.datasets:
            raise _fail(plan, where, f"unknown dataset {name!r}; the config defines {', '.join(plan.datasets)}")
    return names


def _plan_table2(plan: GridPlan, raw: Any, options: dict) -> None:
    from nodulekit.models.registry import paper_name

    if raw is None:
        return
    if not isinstance(raw, dict) or "architectures" not in raw or set(raw) - {"architectures", "sensitivity_dataset"}:
        raise _fail(plan, "table2", "must be {architectures: [...], sensitivity_dataset: NAME}")
    datasets = list(plan.datasets)
    rows = {}
    for i, name in enumerate(_names(plan.config_path, "table2.architectures", raw["architectures"])):
        arch, explicit = _variant(plan, f"table2.architectures[{i}]", name, options)
        rows[paper_name(arch)] = _add_runs(plan, arch, explicit, datasets)
    plan.tables.append(Table("table2", "Table 2: classification accuracy (%) per dataset", datasets, rows, "table2"))
    sens = raw.get("sensitivity_dataset", "d11c" if "d11c" in plan.datasets else datasets[-1])
    plan.sensitivity_dataset = _dataset_list(plan, "table2.sensitivity_dataset", sens)[0]


def _plan_ablations(plan: GridPlan, raw: Any, options: dict) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise _fail(plan, "ablations", "must map table names to {datasets: [...], variants: {label: ...}}")
    for name, spec in raw.items():
        where = f"ablations.{name}"
        if not _SAFE_VALUE.match(str(name)) or name in ("table2", "table5"):
            raise _fail(plan, where, "table names may hold letters, digits, '.', '_' and '-' (not table2/table5)")
        if not isinstance(spec, dict) or not isinstance(spec.get("variants"), dict) or not spec["variants"]:
            raise _fail(plan, where, "needs variants: {label: ARCH or {arch: ARCH, options: {...}}}")
        if set(spec) - {"title", "datasets", "variants"}:
            raise _fail(
                plan, where, f"unknown key(s) {', '.join(sorted(set(spec) - {'title', 'datasets', 'variants'}))}"
            )
        datasets = _dataset_list(plan, f"{where}.datasets", spec.get("datasets"))
        rows = {}
        for label, value in spec["variants"].items():
            arch, explicit = _variant(plan, f"{where}.variants.{label}", value, options)
            rows[str(label)] = _add_runs(plan, arch, explicit, datasets)
        layout = "table3" if len(datasets) == 1 else "table4"
        plan.tables.append(Table(str(name), str(spec.get("title", name)), datasets, rows, layout))


def _plan_table5(plan: GridPlan, raw: Any, options: dict) -> None:
    if raw is None:
        return
    if (
        not isinstance(raw, dict)
        or not {"reference", "against"} <= set(raw)
        or set(raw) - {"reference", "against", "datasets"}
    ):
        raise _fail(plan, "table5", "must be {reference: ARCH, against: [ARCH, ...], datasets: [...]}")
    datasets = _dataset_list(plan, "table5.datasets", raw.get("datasets"))
    reference = _add_runs(plan, *_variant(plan, "table5.reference", raw["reference"], options), datasets)
    against = raw["against"] if isinstance(raw["against"], list) else [raw["against"]]
    if not against:
        raise _fail(plan, "table5.against", "name at least one architecture to compare with")
    others = [
        _add_runs(plan, *_variant(plan, f"table5.against[{i}]", value, options), datasets)
        for i, value in enumerate(against)
    ]
    plan.table5 = {"reference": reference, "against": others, "datasets": datasets}


def _plan_maps(plan: GridPlan, raw: Any, options: dict) -> None:
    from nodulekit.maps import check_method

    if raw is None:
        return
    if not isinstance(raw, dict) or set(raw) != {"dataset", "methods"} or not isinstance(raw["methods"], dict):
        raise _fail(plan, "maps", "must be {dataset: NAME, methods: {METHOD: ARCH, ...}}")
    dataset = _dataset_list(plan, "maps.dataset", raw["dataset"])[0]
    methods = {}
    for method, value in raw["methods"].items():
        where = f"maps.methods.{method}"
        arch, explicit = _variant(plan, where, value, options)
        try:
            check_method(_check_model(plan, where, arch, dict(explicit)), str(method))
        except NodulekitError as exc:
            raise _fail(plan, where, str(exc)) from None
        methods[str(method)] = _add_runs(plan, arch, explicit, [dataset])
    if not methods:
        raise _fail(plan, "maps.methods", "name at least one map method")
    plan.maps = {"dataset": dataset, "methods": methods}


def load_grid(path: str | os.PathLike) -> GridPlan:
    """Read, check and plan a grid config; every problem is one line naming the key."""
    path = Path(path).resolve()
    raw = read_config(path)
    rois, datasets = _datasets(path, raw)
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds:
        raise _fail(path, "seeds", f"must be a list of integers, not {seeds!r}")
    options = raw.get("model_options") or {}
    if not isinstance(options, dict):
        raise _fail(path, "model_options", "must be a mapping of model options")
    plan = GridPlan(
        config_path=path,
        root=Path(path.parent, raw.get("output", "grid")).resolve(),
        rois=rois,
        datasets=datasets,
        folds=_int(path, "folds", raw.get("folds", 5), 2),
        split_seed=_int(path, "split_seed", raw.get("split_seed", 0), 0),
        seeds=[_int(path, "seeds", s, 0) for s in seeds],
        epochs=_int(path, "epochs", raw.get("epochs", TrainConfig.epochs), 1),
        train=_train_settings(path, raw),
        bootstrap=_int(path, "bootstrap", raw.get("bootstrap", 2000), 1),
        model_options=options,
    )
    _plan_table2(plan, raw.get("table2"), options)
    _plan_ablations(plan, raw.get("ablations"), options)
    _plan_table5(plan, raw.get("table5"), options)
    _plan_maps(plan, raw.get("maps"), options)
    if not plan.runs:
        raise _fail(path, "table2", "the grid trains nothing: give table2, ablations, table5 or maps")
    return plan


# --------------------------------------------------------------------------- the jobs' command lines


def _nodulekit(*args: Any) -> str:
    """A shell command running this nodulekit (the same Python, so cluster jobs get the same install)."""
    import shlex
    import sys

    return shlex.join([sys.executable, "-m", "nodulekit", *map(str, args)])


def build_command(plan: GridPlan, dataset: str, output: str) -> str:
    channels = plan.datasets[dataset]["channels"]
    return _nodulekit(
        "build", plan.rois, "--channels", channels, "--folds", plan.folds, "--seed", plan.split_seed,
        "-o", output, "--overwrite", "--no-progress",
    )  # fmt: skip


def train_command(plan: GridPlan, rundir: str, threads: int, fold: int | None = None) -> str:
    """``train`` of one run (all folds, side by side when configured) or of one of its folds."""
    run, t = plan.runs[rundir], plan.train
    args = ["train", plan.dataset_file(run.dataset), "-o", rundir, "--arch", run.arch]
    for key, value in run.options:
        args += ["--model-opt", f"{key}={_text(value)}"]
    args += ["--folds", plan.folds, "--epochs", plan.epochs, "--seed", run.seed, "--no-progress"]
    for key in ("batch_size", "lr", "momentum", "weight_decay", "lr_step", "select", "val_fraction", "device"):
        if key in t:
            args += [f"--{key.replace('_', '-')}", t[key]]
    if fold is not None:
        args += ["--fold", fold]
    elif t["concurrent_folds"]:
        args += ["--concurrent-folds"]
    return f"OMP_NUM_THREADS={int(threads)} " + _nodulekit(*args)


def evaluate_inputs(plan: GridPlan, table: str, dataset: str, seed: int) -> list[str]:
    rows = next(t for t in plan.tables if t.name == table).rows
    return [f for name in dict.fromkeys(rows.values()) for f in plan.results(plan.run_for(name, dataset, seed).rundir)]


def evaluate_command(plan: GridPlan, table: str, dataset: str, seed: int, output_dir: str) -> str:
    rows = next(t for t in plan.tables if t.name == table).rows
    rundirs = [plan.run_for(name, dataset, seed).rundir for name in dict.fromkeys(rows.values())]
    return _nodulekit(
        "evaluate", *rundirs, "-o", output_dir, "--overwrite", "--bootstrap", plan.bootstrap, "--seed", seed
    )


def wilcoxon_rundirs(plan: GridPlan, dataset: str, seed: int) -> list[str]:
    names = [plan.table5["reference"], *plan.table5["against"]]
    return [plan.run_for(name, dataset, seed).rundir for name in names]


def wilcoxon_command(plan: GridPlan, dataset: str, seed: int, output_md: str) -> str:
    return _nodulekit("wilcoxon", *wilcoxon_rundirs(plan, dataset, seed), "-o", output_md, "--overwrite")


def maps_rundir(plan: GridPlan, method: str) -> str:
    return plan.run_for(plan.maps["methods"][method], plan.maps["dataset"], plan.seeds[0]).rundir


def maps_command(plan: GridPlan, method: str, output: str) -> str:
    dataset = plan.dataset_file(plan.maps["dataset"])
    return _nodulekit("maps", maps_rundir(plan, method), "--method", method, "-d", dataset, "-o", output, "--overwrite")


def scores_command(plan: GridPlan, maps_files: list[str], output: str) -> str:
    dataset = plan.dataset_file(plan.maps["dataset"])
    return _nodulekit("scores", *maps_files, "-d", dataset, "-o", output, "--overwrite")


def figures_command(plan: GridPlan, maps_files: list[str], scores: str, output_dir: str) -> str:
    dataset = plan.dataset_file(plan.maps["dataset"])
    return _nodulekit("figures", *maps_files, "-d", dataset, "--scores", scores, "-o", output_dir, "--overwrite")


def report_command(plan: GridPlan, output: str) -> str:
    return _nodulekit("grid-report", plan.config_path, "-o", output)


# --------------------------------------------------------------------------- running it

GRID_CLAIM = "grid.claim.json"
SLURM_PLUGIN = "snakemake_executor_plugin_slurm"


def find_profile(profile: str) -> Path:
    """A Snakemake profile folder: a path, or a name in Snakemake's profile folders; else one line."""
    given = Path(profile).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    candidates = [given] if given.is_absolute() or os.sep in profile else [given, config_home / "snakemake" / profile,
                                                                          Path("/etc/xdg/snakemake") / profile]  # fmt: skip
    for folder in candidates:
        if folder.is_dir() and any(
            (folder / n).is_file() for n in ("config.yaml", "config.v8+.yaml", "config.v9+.yaml")
        ):
            return folder.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise NodulekitError(
        f"cluster profile {profile!r} not found (looked for config.yaml in {looked}); see examples/grid/slurm/"
    )


def _check_executor(profile: Path) -> None:
    import importlib.util

    import yaml

    name = next(n for n in ("config.v9+.yaml", "config.v8+.yaml", "config.yaml") if (profile / n).is_file())
    executor = (yaml.safe_load((profile / name).read_text()) or {}).get("executor")
    if executor == "slurm" and importlib.util.find_spec(SLURM_PLUGIN) is None:
        raise NodulekitError(
            f"profile {profile} runs jobs on Slurm, but the executor plugin is not installed: "
            "pip install 'nodulekit[slurm]'"
        )


def snakemake_command(plan: GridPlan, *, cores: int | None, profile: Path | None, dry_run: bool,
                      keep_going: bool, quiet: bool, extra: list[str]) -> list[str]:  # fmt: skip
    """The Snakemake command line that runs the grid (printed, so it can be run by hand)."""
    import sys

    snakefile = Path(__file__).parent / "workflow" / "Snakefile"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile)]
    # Not a bare --quiet, which hides failed jobs' logs too; its values end at the next option.
    cmd += ["--quiet", "progress", "host"] * quiet + ["--directory", str(plan.root)]
    cmd += ["--config", f"grid_config={plan.config_path}", "--rerun-incomplete", "--nolock"]
    cmd += ["--show-failed-logs"]  # each job logs to its own file: print a failed job's log here
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if cores is not None or profile is None:
        cmd += ["--cores", str(cores) if cores is not None else "all"]
    cmd += ["--dry-run"] * dry_run + ["--keep-going"] * keep_going
    return cmd + list(extra)


def run_grid(config: str | os.PathLike, *, cores: int | None = None, profile: str | None = None,
             dry_run: bool = False, keep_going: bool = True, quiet: bool = False,
             extra: list[str] | None = None) -> int:  # fmt: skip
    """Check and plan CONFIG, then run its workflow with Snakemake; returns Snakemake's exit status.

    Everything that can be checked is checked before the first job: the config, the
    profile (and its executor plugin), and that no other ``nodulekit grid`` runs in the
    same output folder (Snakemake's own lock is replaced by this claim, which a killed
    grid leaves stale and the next run takes over, instead of asking for ``--unlock``).
    """
    import importlib.util
    import subprocess
    import sys

    from nodulekit import claims

    if importlib.util.find_spec("snakemake") is None:
        raise NodulekitError("the grid needs Snakemake: pip install 'nodulekit[grid]'")
    plan = load_grid(config)
    folder = find_profile(profile) if profile else None
    if folder is not None:
        _check_executor(folder)
    cmd = snakemake_command(plan, cores=cores, profile=folder, dry_run=dry_run, keep_going=keep_going,
                            quiet=quiet, extra=extra or [])  # fmt: skip
    from nodulekit.printing import printable

    print(
        printable(f"nodulekit grid: {len(plan.runs)} runs x {plan.folds} folds; output in {plan.root}"), file=sys.stderr
    )
    print(printable("nodulekit grid: " + " ".join(cmd)), file=sys.stderr)
    if dry_run:  # lists jobs, writes nothing: no claim needed
        return subprocess.run(cmd).returncode
    mine = claims.acquire(plan.root, GRID_CLAIM, doing="run")
    try:
        with claims.heartbeat({plan.root: mine}, GRID_CLAIM):
            return _run_snakemake(cmd, plan)
    finally:
        claims.release(plan.root, mine, GRID_CLAIM)


STOP_GRACE_S = 10.0  # after SIGTERM, the jobs' time to unwind (release claims) before SIGKILL


def _run_snakemake(cmd: list[str], plan: GridPlan) -> int:
    """Run Snakemake in a process group of its own; when this process is interrupted or
    terminated, stop that whole group (Snakemake and every job it started) within seconds,
    and release the fold claims of jobs that had to be killed."""
    import signal
    import subprocess

    from nodulekit import claims
    from nodulekit.workers import stop_group

    proc = subprocess.Popen(cmd, start_new_session=True)  # Ctrl-C reaches only us: we stop the group
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup short
            signal.signal(signum, signal.SIG_IGN)
        stop_group(proc.pid, STOP_GRACE_S, leader=proc.pid)  # Snakemake goes once its jobs are gone
        proc.wait()
        folds = [plan.root / rundir / f"fold{k}" for rundir in plan.runs for k in range(plan.folds)]
        claims.release_dead(folds)
        raise
