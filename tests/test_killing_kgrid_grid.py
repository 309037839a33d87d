"""The grid's plan and every job's command line, computed in-process from hand-written configs.

The Snakefile calls these functions inside Snakemake's own process (and the jobs run as child
processes), so the end-to-end grid test never shows a wrong option value, a dropped flag or a
wrong default to coverage: here each command line is compared, option by option, with the one
written out by hand from the config.
"""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from nodulekit import grid as G
from nodulekit.errors import NodulekitError
from nodulekit.grid import GridConfigError, load_grid

NK = [sys.executable, "-m", "nodulekit"]

# Every `train` option the grid passes on, two seeds, a dataset given as a file, an alias
# (ours-cam), an ablation on one dataset and one on all, Table 5 and two map methods.
FULL = """
output: results
rois: rois.h5
datasets: {d1c: 1, given: {path: given.h5}}
folds: 3
split_seed: 7
seeds: [3, 5]
epochs: 4
train: {batch_size: 16, lr: 0.02, momentum: 0.8, weight_decay: 0.001, lr_step: 9, select: val,
        val_fraction: 0.25, device: cpu, threads: 3}
model_options: {base_width: 4}
bootstrap: 77
table2:
  architectures: [ours-cam, hesam]
ablations:
  pooling:
    title: "Pooling of HF"
    datasets: [given]
    variants:
      GAP: {arch: hesam, options: {hf_pool: avg}}
      GMP: hesam
  wide:
    variants:
      W8: {arch: cam, options: {base_width: 8}}
table5: {reference: hesam, against: cam}
maps: {dataset: given, methods: {hesam: hesam, cam: ours-cam}}
"""

# The smallest config: every default of the grid applies.
MINIMAL = """
datasets: {d3c: {path: d3c.h5}}
table2: {architectures: cam}
"""


def write(folder: Path, text: str) -> Path:
    for name in ("rois.h5", "given.h5", "d3c.h5"):
        (folder / name).write_bytes(b"")  # planning checks only that they exist
    path = folder / "grid.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return load_grid(write(tmp_path_factory.mktemp("full"), FULL))


def argv(command: str) -> list[str]:
    return shlex.split(command)


# --------------------------------------------------------------------------- the plan


def test_full_plan_runs_tables_and_settings(full):
    folder = full.config_path.parent
    assert full.root == folder / "results" and full.rois == folder / "rois.h5"
    assert full.datasets == {"d1c": {"channels": 1}, "given": {"path": folder / "given.h5"}}
    assert (full.folds, full.split_seed, full.seeds, full.epochs, full.bootstrap) == (3, 7, [3, 5], 4, 77)
    assert full.model_options == {"base_width": 4}
    # the grid's own defaults fill what the config leaves out; no GPU: one job per fold
    assert full.train == {"batch_size": 16, "lr": 0.02, "momentum": 0.8, "weight_decay": 0.001, "lr_step": 9,
                          "select": "val", "val_fraction": 0.25, "device": "cpu", "threads": 3, "gpus": 0,
                          "concurrent_folds": False}  # fmt: skip
    names = {
        "cam+base_width=4": ["d1c", "given"],
        "hesam+base_width=4": ["d1c", "given"],
        "hesam+base_width=4+hf_pool=avg": ["given"],
        "cam+base_width=8": ["d1c", "given"],
    }
    expected = {f"runs/{d}/seed{s}/{n}" for n, ds in names.items() for d in ds for s in (3, 5)}
    assert set(full.runs) == expected and len(full.runs) == 14
    run = full.runs["runs/given/seed5/hesam+base_width=4+hf_pool=avg"]
    assert (run.arch, run.options, run.dataset, run.seed) == (
        "hesam",
        (("base_width", 4), ("hf_pool", "avg")),
        "given",
        5,
    )
    assert full.runs["runs/d1c/seed3/cam+base_width=4"].arch == "cam"  # the alias ours-cam, canonical
    t2, pooling, wide = full.tables
    assert (t2.name, t2.title, t2.datasets, t2.layout) == (
        "table2", "Table 2: classification accuracy (%) per dataset", ["d1c", "given"], "table2")  # fmt: skip
    assert t2.rows == {"Ours-CAM": "cam+base_width=4", "Ours-HESAM": "hesam+base_width=4"}
    assert (pooling.name, pooling.title, pooling.datasets, pooling.layout) == (
        "pooling",
        "Pooling of HF",
        ["given"],
        "table3",
    )
    assert pooling.rows == {"GAP": "hesam+base_width=4+hf_pool=avg", "GMP": "hesam+base_width=4"}
    # no title: the table's name; no datasets: all of them, in the config's order (Table 4's layout)
    assert (wide.name, wide.title, wide.datasets, wide.layout) == ("wide", "wide", ["d1c", "given"], "table4")
    assert wide.rows == {"W8": "cam+base_width=8"}
    assert full.sensitivity_dataset == "given"  # no d11c: the last dataset
    assert full.table5 == {"reference": "hesam+base_width=4", "against": ["cam+base_width=4"],
                           "datasets": ["d1c", "given"]}  # fmt: skip
    assert full.maps == {"dataset": "given", "methods": {"hesam": "hesam+base_width=4", "cam": "cam+base_width=4"}}


def test_full_plan_paths_labels_and_report_inputs(full):
    assert full.dataset_file("d1c") == "datasets/d1c.h5"
    assert full.dataset_file("given") == str(full.config_path.parent / "given.h5")
    assert full.results("runs/x") == ["runs/x/fold0/result.h5", "runs/x/fold1/result.h5", "runs/x/fold2/result.h5"]
    assert full.run_for("cam+base_width=8", "given", 5).rundir == "runs/given/seed5/cam+base_width=8"
    assert full.evaluate_report("pooling", "given", 5) == "reports/pooling/given-seed5/table2.json"
    assert full.wilcoxon_report("d1c", 3) == "reports/table5/d1c-seed3.json"
    assert full.maps_dir() == "maps/given-seed3"  # the first seed's runs
    # a label names only the options the grid does not give every architecture
    assert full.label("cam+base_width=4", "d1c", 3) == "Ours-CAM"
    assert full.label("cam+base_width=8", "d1c", 3) == "Ours-CAM (base_width=8)"
    assert full.label("hesam+base_width=4+hf_pool=avg", "given", 5) == "Ours-HESAM (hf_pool=avg)"
    assert full.final_targets() == ["report.md", "report.json"]
    tables = [("table2", ["d1c", "given"]), ("pooling", ["given"]), ("wide", ["d1c", "given"])]
    expected = [f"reports/{t}/{d}-seed{s}/table2.json" for t, ds in tables for d in ds for s in (3, 5)]
    expected += [f"reports/table5/{d}-seed{s}.json" for d in ("d1c", "given") for s in (3, 5)]
    assert full.report_inputs() == expected + ["maps/given-seed3/scores.csv"]


def test_minimal_config_takes_the_documented_defaults(tmp_path):
    from nodulekit.train_config import TrainConfig

    plan = load_grid(write(tmp_path, MINIMAL))
    assert plan.root == tmp_path / "grid" and plan.rois is None
    assert (plan.folds, plan.split_seed, plan.seeds, plan.bootstrap) == (5, 0, [0], 2000)
    assert plan.epochs == TrainConfig.epochs == 90
    assert plan.train == {"threads": 2, "gpus": 0, "concurrent_folds": False}
    assert plan.model_options == {} and plan.table5 is None and plan.maps is None
    assert list(plan.runs) == ["runs/d3c/seed0/cam"]  # no option differs from the model's defaults
    assert plan.label("cam", "d3c", 0) == "Ours-CAM"
    assert plan.report_inputs() == ["reports/table2/d3c-seed0/table2.json"]
    # a single seed as a number; a table2 sensitivity dataset of d11c is chosen over the last one
    (tmp_path / "d11c.h5").write_bytes(b"")
    other = load_grid(write(tmp_path, "datasets: {d11c: {path: d11c.h5}, d3c: {path: d3c.h5}}\nseeds: 4\n"
                                      "table2: {architectures: [cam]}\n"))  # fmt: skip
    assert other.seeds == [4] and other.sensitivity_dataset == "d11c"
    assert sorted(other.runs) == ["runs/d11c/seed4/cam", "runs/d3c/seed4/cam"]


def test_gpus_and_global_options_a_model_does_not_take(tmp_path):
    # hf_pool is HESAM's only: CAM's runs are planned without it
    text = MINIMAL.replace("cam}", "[cam, hesam]}") + "model_options: {hf_pool: avg}\ntrain: {gpus: 2}\n"
    plan = load_grid(write(tmp_path, text))
    assert sorted(plan.runs) == ["runs/d3c/seed0/cam", "runs/d3c/seed0/hesam+hf_pool=avg"]
    assert plan.train == {"threads": 2, "gpus": 2, "concurrent_folds": False}
    assert plan.label("hesam+hf_pool=avg", "d3c", 0) == "Ours-HESAM"  # every run has it: not in the label
    # an option equal to the model's default is no option: the same run as without it
    same = load_grid(write(tmp_path, OK + "ablations: {t: {variants: {a: {arch: cam, options: {base_width: 64}}}}}\n"))
    assert list(same.runs) == ["runs/d1/seed0/cam"]


# --------------------------------------------------------------------------- one-line errors


def error(folder: Path, text: str) -> str:
    path = write(folder, text)
    with pytest.raises(GridConfigError) as info:
        load_grid(path)
    message = str(info.value)
    assert "\n" not in message
    prefix = f"{path.resolve()}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "a grid config is a YAML mapping (key: value lines)"),
        ("datasets: [\n", "line 2: not valid YAML (expected the node content, but found '<stream end>')"),
        (
            "table2: {architectures: cam}\n",
            "datasets: name at least one dataset, e.g. `d11c: 11` (built from rois) or `d11c: {path: d11c.h5}`",
        ),  # fmt: skip
        (
            "datasets: {}\n",
            "datasets: name at least one dataset, e.g. `d11c: 11` (built from rois) or `d11c: {path: d11c.h5}`",
        ),  # fmt: skip
        (
            "datasets: {d/1: 1}\nrois: rois.h5\n",
            "datasets.d/1: dataset names may hold letters, digits, '.', '_' and '-' only",
        ),  # fmt: skip
        ("datasets: {d1: {path: none.h5}}\n", "datasets.d1.path: {folder}/none.h5 does not exist"),
        ("datasets: {d1: 3}\n", "datasets.d1: is built from `rois:`, which the config does not name"),
        (
            "datasets: {d1: true}\nrois: rois.h5\n",
            "datasets.d1: must be a channel count (1, 3, 11, 21) or {path: FILE}, not True",
        ),  # fmt: skip
        (
            "datasets: {d1: {path: given.h5, x: 1}}\n",
            "datasets.d1: must be a channel count (1, 3, 11, 21) or {path: FILE}, not {'path': 'given.h5', 'x': 1}",
        ),
        (
            "datasets: {d1: 3}\nrois: none.h5\n",
            "rois: {folder}/none.h5 does not exist (write it with `nodulekit extract`)",
        ),  # fmt: skip
        ("datasets: {d1: 1}\nrois: rois.h5\nfolds: 1\n", "folds: must be an integer >= 2, not 1"),
        ("datasets: {d1: 1}\nrois: rois.h5\nfolds: true\n", "folds: must be an integer >= 2, not True"),
        ("datasets: {d1: 1}\nrois: rois.h5\nfolds: 2.0\n", "folds: must be an integer >= 2, not 2.0"),
        ("datasets: {d1: 1}\nrois: rois.h5\nsplit_seed: -1\n", "split_seed: must be an integer >= 0, not -1"),
        ("datasets: {d1: 1}\nrois: rois.h5\nepochs: 0\n", "epochs: must be an integer >= 1, not 0"),
        ("datasets: {d1: 1}\nrois: rois.h5\nbootstrap: 0\n", "bootstrap: must be an integer >= 1, not 0"),
        ("datasets: {d1: 1}\nrois: rois.h5\nseeds: [1, -2]\n", "seeds: must be an integer >= 0, not -2"),
        ("datasets: {d1: 1}\nrois: rois.h5\nseeds: []\n", "seeds: must be a list of integers, not []"),
        ("datasets: {d1: 1}\nrois: rois.h5\nseeds: x\n", "seeds: must be a list of integers, not 'x'"),
        ("datasets: {d1: 1}\nrois: rois.h5\nmodel_options: [1]\n", "model_options: must be a mapping of model options"),
        (
            "datasets: {d1: 1}\nrois: rois.h5\n",
            "table2: the grid trains nothing: give table2, ablations, table5 or maps",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    assert error(tmp_path, text) == message.replace("{folder}", str(tmp_path))


def test_missing_config_and_unknown_keys(tmp_path):
    with pytest.raises(GridConfigError, match=r"^grid config \S+nothing.yaml does not exist$"):
        load_grid(tmp_path / "nothing.yaml")
    known = "ablations, bootstrap, datasets, epochs, folds, maps, model_options, output, rois, seeds, split_seed, table2, table5, train"
    assert error(tmp_path, "zeta: 1\nalpha: 2\n" + MINIMAL) == f"unknown key(s) alpha, zeta; known: {known}"


OK = "datasets: {d1: {path: given.h5}}\n"


@pytest.mark.parametrize(
    "train, message",
    [
        ("[1]", "train: must be a mapping of `nodulekit train` options"),
        (
            "{lrr: 1}",
            "train.lrr: unknown option; known: batch_size, concurrent_folds, device, gpus, lr, lr_step, "
            "momentum, select, threads, val_fraction, weight_decay",
        ),  # fmt: skip
        ("{batch_size: 2.5}", "train.batch_size: must be int, not 2.5"),
        ("{batch_size: true}", "train.batch_size: must be int, not True"),
        ("{lr: true}", "train.lr: must be float, not True"),
        ("{lr: fast}", "train.lr: must be float, not 'fast'"),
        ("{device: 0}", "train.device: must be str, not 0"),
        ("{concurrent_folds: 1}", "train.concurrent_folds: must be bool, not 1"),
        ("{select: best}", "train.select: must be one of last, val, not 'best'"),
        ("{batch_size: 0}", "train: --batch-size must be at least 2 for batch normalisation (got 0)"),
    ],
)
def test_train_settings_errors(tmp_path, train, message):
    assert error(tmp_path, OK + f"train: {train}\ntable2: {{architectures: cam}}\n") == message


def test_train_accepts_an_integer_learning_rate_and_ignores_the_device_when_validating(tmp_path):
    # lr 1 (an int) is a float option's value; "device" is not checked by TrainConfig here
    plan = load_grid(write(tmp_path, OK + "train: {lr: 1, device: tpu9, concurrent_folds: true}\n"
                                          "table2: {architectures: cam}\n"))  # fmt: skip
    assert plan.train["lr"] == 1 and plan.train["device"] == "tpu9" and plan.train["concurrent_folds"] is True


@pytest.mark.parametrize(
    "tables, message",
    [
        ("table2: [cam]", "table2: must be {architectures: [...], sensitivity_dataset: NAME}"),
        ("table2: {sensitivity_dataset: d1}", "table2: must be {architectures: [...], sensitivity_dataset: NAME}"),
        ("table2: {architectures: []}", "table2.architectures: must be a name or a non-empty list of names, not []"),
        (
            "table2: {architectures: [cam, 3]}",
            "table2.architectures: must be a name or a non-empty list of names, not ['cam', 3]",
        ),  # fmt: skip
        (
            "table2: {architectures: [cam], sensitivity_dataset: d9}",
            "table2.sensitivity_dataset: unknown dataset 'd9'; the config defines d1, d2",
        ),  # fmt: skip
        (
            "table2: {architectures: [{arch: cam}]}",
            "table2.architectures: must be a name or a non-empty list of names, not [{'arch': 'cam'}]",
        ),  # fmt: skip
        (
            "ablations: {t: {variants: {a: {arch: cam, opts: {}}}}}",
            "ablations.t.variants.a: must be an architecture name or {arch: NAME, options: {...}}, "
            "not {'arch': 'cam', 'opts': {}}",
        ),  # fmt: skip
        (
            "ablations: {t: {variants: {a: {options: {}}}}}",
            "ablations.t.variants.a: must be an architecture name or {arch: NAME, options: {...}}, not {'options': {}}",
        ),
        (
            "ablations: {t: {variants: {a: 3}}}",
            "ablations.t.variants.a: must be an architecture name or {arch: NAME, options: {...}}, not 3",
        ),
        (
            "ablations: {t: {variants: {a: cam, b: {arch: cam, options: [1]}}}}",
            "ablations.t.variants.b: options must be a mapping, not [1]",
        ),  # fmt: skip
        (
            "table2: {architectures: [cam, nope]}",
            "table2.architectures[1]: unknown model architecture 'nope'; available: ",
        ),  # fmt: skip
        ("ablations: [1]", "ablations: must map table names to {datasets: [...], variants: {label: ...}}"),
        (
            "ablations: {table5: {variants: {a: cam}}}",
            "ablations.table5: table names may hold letters, digits, '.', '_' and '-' (not table2/table5)",
        ),  # fmt: skip
        (
            "ablations: {table2: {variants: {a: cam}}}",
            "ablations.table2: table names may hold letters, digits, '.', '_' and '-' (not table2/table5)",
        ),  # fmt: skip
        (
            "ablations: {t 3: {variants: {a: cam}}}",
            "ablations.t 3: table names may hold letters, digits, '.', '_' and '-' (not table2/table5)",
        ),  # fmt: skip
        (
            "ablations: {t3: {variants: {}}}",
            "ablations.t3: needs variants: {label: ARCH or {arch: ARCH, options: {...}}}",
        ),
        ("ablations: {t3: [cam]}", "ablations.t3: needs variants: {label: ARCH or {arch: ARCH, options: {...}}}"),
        (
            "ablations: {t3: {datasets: d1}}",
            "ablations.t3: needs variants: {label: ARCH or {arch: ARCH, options: {...}}}",
        ),
        ("ablations: {t3: {variants: {a: cam}, z: 1, b: 2}}", "ablations.t3: unknown key(s) b, z"),
        ("ablations: {t3: {variants: {a: camm}}}", "ablations.t3.variants.a: unknown model architecture 'camm'"),
        ("table5: [cam]", "table5: must be {reference: ARCH, against: [ARCH, ...], datasets: [...]}"),
        ("table5: {reference: cam}", "table5: must be {reference: ARCH, against: [ARCH, ...], datasets: [...]}"),
        ("table5: {against: cam}", "table5: must be {reference: ARCH, against: [ARCH, ...], datasets: [...]}"),
        (
            "table5: {reference: cam, against: sam, seeds: 1}",
            "table5: must be {reference: ARCH, against: [ARCH, ...], datasets: [...]}",
        ),  # fmt: skip
        ("table5: {reference: cam, against: []}", "table5.against: name at least one architecture to compare with"),
        ("table5: {reference: cam, against: sam, datasets: [d3]}", "table5.datasets: unknown dataset 'd3'"),
        ("table5: {reference: camm, against: sam}", "table5.reference: unknown model architecture 'camm'"),
        ("table5: {reference: cam, against: [sam, samm]}", "table5.against[1]: unknown model architecture 'samm'"),
        ("maps: [cam]", "maps: must be {dataset: NAME, methods: {METHOD: ARCH, ...}}"),
        ("maps: {dataset: d1}", "maps: must be {dataset: NAME, methods: {METHOD: ARCH, ...}}"),
        ("maps: {dataset: d1, methods: [cam]}", "maps: must be {dataset: NAME, methods: {METHOD: ARCH, ...}}"),
        ("maps: {dataset: d1, methods: {}}", "maps.methods: name at least one map method"),
        ("maps: {dataset: d5, methods: {cam: cam}}", "maps.dataset: unknown dataset 'd5'"),
        ("maps: {dataset: d1, methods: {cam: camm}}", "maps.methods.cam: unknown model architecture 'camm'"),
        ("maps: {dataset: d1, methods: {sam: cam}}", "maps.methods.sam: method 'sam' does not apply to model 'cam'"),
    ],
)
def test_table_errors_name_the_key(tmp_path, tables, message):
    text = "datasets: {d1: {path: given.h5}, d2: {path: d3c.h5}}\n" + tables + "\n"
    got = error(tmp_path, text)
    assert got.startswith(message), got


def test_a_model_option_that_breaks_the_model_is_one_line(tmp_path):
    got = error(tmp_path, OK + "ablations: {t: {variants: {a: {arch: cam, options: {base_width: 0}}}}}\n")
    assert got == "ablations.t.variants.a: model 'cam': option base_width must be a positive integer, not 0"
    got = error(tmp_path, OK + "ablations: {t: {variants: {a: {arch: hesam, options: {fusion: a/b}}}}}\n")
    assert got == "ablations.t.variants.a: model 'hesam': option fusion='a/b' is not one of 'sum', 'concat'"


def test_rois_are_needed_only_by_datasets_built_from_them(tmp_path):
    plan = load_grid(write(tmp_path, "rois: none.h5\n" + OK + "table2: {architectures: cam}\n"))
    assert plan.rois == tmp_path / "none.h5" and plan.datasets == {"d1": {"path": tmp_path / "given.h5"}}


def test_maps_planned_alone_train_only_the_maps_runs(tmp_path):
    plan = load_grid(write(tmp_path, OK + "seeds: [2, 1]\nmaps: {dataset: d1, methods: {sam: sam}}\n"))
    # only the first seed's run makes the maps
    assert sorted(plan.runs) == ["runs/d1/seed1/sam", "runs/d1/seed2/sam"]
    assert plan.tables == [] and plan.maps == {"dataset": "d1", "methods": {"sam": "sam"}}
    assert plan.report_inputs() == ["maps/d1-seed2/scores.csv"]
    assert G.maps_rundir(plan, "sam") == "runs/d1/seed2/sam"


def test_a_key_given_twice_names_its_line(tmp_path):
    assert error(tmp_path, OK + "table2: {architectures: cam}\nseeds: 1\nseeds: 2\n") == (
        "line 4: not valid YAML (key 'seeds' is given twice)"
    )


# --------------------------------------------------------------------------- the jobs' command lines


def test_build_command(full):
    cmd = argv(G.build_command(full, "d1c", "datasets/d1c.h5"))
    assert cmd == NK + ["build", str(full.rois), "--channels", "1", "--folds", "3", "--seed", "7",
                        "-o", "datasets/d1c.h5", "--overwrite", "--no-progress"]  # fmt: skip


def test_train_command_of_a_fold_and_of_a_whole_run(full):
    rundir = "runs/given/seed5/hesam+base_width=4+hf_pool=avg"
    head, *rest = G.train_command(full, rundir, threads=6, fold=2).split(" ", 1)
    assert head == "OMP_NUM_THREADS=6"
    expected = NK + ["train", str(full.config_path.parent / "given.h5"), "-o", rundir, "--arch", "hesam",
                     "--model-opt", "base_width=4", "--model-opt", "hf_pool=avg",
                     "--folds", "3", "--epochs", "4", "--seed", "5", "--no-progress",
                     "--batch-size", "16", "--lr", "0.02", "--momentum", "0.8", "--weight-decay", "0.001",
                     "--lr-step", "9", "--select", "val", "--val-fraction", "0.25", "--device", "cpu"]  # fmt: skip
    assert argv(rest[0]) == expected + ["--fold", "2"]
    # fold 0 is a fold too (not "no fold")
    assert argv(G.train_command(full, rundir, threads=1, fold=0))[-2:] == ["--fold", "0"]
    # the whole run: no --fold, and not side by side unless configured
    whole = G.train_command(full, rundir, threads=2.9)
    assert whole.startswith("OMP_NUM_THREADS=2 ") and argv(whole.split(" ", 1)[1]) == expected


def test_train_command_side_by_side_and_without_options(tmp_path):
    plan = load_grid(write(tmp_path, MINIMAL + "train: {concurrent_folds: true}\n"))
    cmd = argv(G.train_command(plan, "runs/d3c/seed0/cam", threads=1).split(" ", 1)[1])
    assert cmd == NK + ["train", str(tmp_path / "d3c.h5"), "-o", "runs/d3c/seed0/cam", "--arch", "cam",
                        "--folds", "5", "--epochs", "90", "--seed", "0", "--no-progress", "--concurrent-folds"]  # fmt: skip


def test_evaluate_inputs_and_command(full):
    # Table 3 (pooling) on one dataset: its two runs' folds, each run once
    files = G.evaluate_inputs(full, "pooling", "given", 5)
    runs = ["runs/given/seed5/hesam+base_width=4+hf_pool=avg", "runs/given/seed5/hesam+base_width=4"]
    assert files == [f"{r}/fold{k}/result.h5" for r in runs for k in range(3)]
    cmd = argv(G.evaluate_command(full, "table2", "d1c", 3, "reports/table2/d1c-seed3"))
    assert cmd == NK + ["evaluate", "runs/d1c/seed3/cam+base_width=4", "runs/d1c/seed3/hesam+base_width=4",
                        "-o", "reports/table2/d1c-seed3", "--overwrite", "--bootstrap", "77", "--seed", "3"]  # fmt: skip


def test_evaluate_of_a_table_whose_rows_share_a_run(tmp_path):
    text = OK + "ablations: {t3: {variants: {a: cam, b: {arch: cam, options: {base_width: 64}}}}}\n"
    plan = load_grid(write(tmp_path, text))
    assert G.evaluate_inputs(plan, "t3", "d1", 0) == [f"runs/d1/seed0/cam/fold{k}/result.h5" for k in range(5)]
    assert argv(G.evaluate_command(plan, "t3", "d1", 0, "out"))[4:6] == ["runs/d1/seed0/cam", "-o"]


def test_wilcoxon_maps_scores_figures_and_report_commands(full):
    given = str(full.config_path.parent / "given.h5")
    assert G.wilcoxon_rundirs(full, "d1c", 5) == [
        "runs/d1c/seed5/hesam+base_width=4",
        "runs/d1c/seed5/cam+base_width=4",
    ]
    assert argv(G.wilcoxon_command(full, "d1c", 5, "reports/table5/d1c-seed5.md")) == NK + [
        "wilcoxon", "runs/d1c/seed5/hesam+base_width=4", "runs/d1c/seed5/cam+base_width=4",
        "-o", "reports/table5/d1c-seed5.md", "--overwrite"]  # fmt: skip
    assert G.maps_rundir(full, "cam") == "runs/given/seed3/cam+base_width=4"
    assert argv(G.maps_command(full, "hesam", "maps/given-seed3/hesam.h5")) == NK + [
        "maps", "runs/given/seed3/hesam+base_width=4", "--method", "hesam", "-d", given,
        "-o", "maps/given-seed3/hesam.h5", "--overwrite"]  # fmt: skip
    maps = ["maps/given-seed3/hesam.h5", "maps/given-seed3/cam.h5"]
    assert argv(G.scores_command(full, maps, "maps/given-seed3/scores.csv")) == NK + [
        "scores", *maps, "-d", given, "-o", "maps/given-seed3/scores.csv", "--overwrite"]  # fmt: skip
    assert argv(G.figures_command(full, maps, "s.csv", "maps/given-seed3/figures")) == NK + [
        "figures", *maps, "-d", given, "--scores", "s.csv", "-o", "maps/given-seed3/figures", "--overwrite"]  # fmt: skip
    assert argv(G.report_command(full, "report.md")) == NK + ["grid-report", str(full.config_path), "-o", "report.md"]


def test_dataset_built_by_the_grid_is_read_from_datasets(full):
    cmd = argv(G.train_command(full, "runs/d1c/seed3/cam+base_width=8", threads=1, fold=1).split(" ", 1)[1])
    assert cmd[3:9] == ["train", "datasets/d1c.h5", "-o", "runs/d1c/seed3/cam+base_width=8", "--arch", "cam"]
    assert cmd[9:11] == ["--model-opt", "base_width=8"] and cmd[cmd.index("--seed") + 1] == "3"


# --------------------------------------------------------------------------- Snakemake and profiles


def test_snakemake_command_lines(full):
    snakefile = str(Path(G.__file__).parent / "workflow" / "Snakefile")
    head = [sys.executable, "-m", "snakemake", "--snakefile", snakefile]
    middle = ["--directory", str(full.root), "--config", f"grid_config={full.config_path}", "--rerun-incomplete",
              "--nolock", "--show-failed-logs"]  # fmt: skip
    local = G.snakemake_command(full, cores=None, profile=None, dry_run=False, keep_going=False, quiet=False, extra=[])
    assert local == head + middle + ["--cores", "all"]
    quiet = G.snakemake_command(full, cores=3, profile=None, dry_run=True, keep_going=True, quiet=True, extra=["-p"])
    assert quiet == head + ["--quiet", "progress", "host"] + middle + [
        "--cores",
        "3",
        "--dry-run",
        "--keep-going",
        "-p",
    ]
    prof = Path("/some/profile")
    cluster = G.snakemake_command(full, cores=None, profile=prof, dry_run=False, keep_going=True, quiet=False, extra=[])
    assert cluster == head + middle + ["--profile", "/some/profile", "--keep-going"]  # the profile sets the cores
    both = G.snakemake_command(full, cores=0, profile=prof, dry_run=False, keep_going=False, quiet=False, extra=[])
    assert both[-4:] == ["--profile", "/some/profile", "--cores", "0"]


def test_find_profile_by_path_and_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name, config in (("v8", "config.v8+.yaml"), ("v9", "config.v9+.yaml"), ("plain", "config.yaml")):
        folder = tmp_path / "xdg" / "snakemake" / name
        folder.mkdir(parents=True)
        (folder / config).write_text("cores: 1\n")
        assert G.find_profile(name) == folder
        assert G.find_profile(str(folder)) == folder  # a path (holds a separator)
    empty = tmp_path / "xdg" / "snakemake" / "empty"
    empty.mkdir()
    (empty / "other.yaml").write_text("")
    with pytest.raises(NodulekitError) as info:
        G.find_profile("empty")
    assert str(info.value) == (
        f"cluster profile 'empty' not found (looked for config.yaml in empty, {empty}, /etc/xdg/snakemake/empty); "
        "see examples/grid/slurm/"
    )
    with pytest.raises(NodulekitError, match=rf"^cluster profile '{tmp_path}/none' not found \(looked for config.yaml "
                       rf"in {tmp_path}/none\); see examples/grid/slurm/$"):  # fmt: skip
        G.find_profile(str(tmp_path / "none"))
    # the default config home is ~/.config
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / ".config" / "snakemake" / "mine"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("")
    assert G.find_profile("mine") == folder
    # a relative path given as such is used where it is
    monkeypatch.chdir(tmp_path)
    assert G.find_profile("home/.config/snakemake/mine") == folder


def test_check_executor_reads_the_newest_profile_file(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == G.SLURM_PLUGIN else real(n, *a))
    (tmp_path / "config.yaml").write_text("executor: local\n")
    G._check_executor(tmp_path)  # local: no plugin needed
    (tmp_path / "config.v8+.yaml").write_text("executor: slurm\n")
    with pytest.raises(NodulekitError) as info:
        G._check_executor(tmp_path)
    assert str(info.value) == (
        f"profile {tmp_path} runs jobs on Slurm, but the executor plugin is not installed: pip install 'nodulekit[slurm]'"
    )
    (tmp_path / "config.v9+.yaml").write_text("")  # read first: an empty file sets no executor
    G._check_executor(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == G.SLURM_PLUGIN else real(n, *a))
    (tmp_path / "config.v9+.yaml").write_text("executor: slurm\n")
    G._check_executor(tmp_path)  # the plugin is there


def test_run_grid_prints_the_plan_and_holds_the_claim_while_snakemake_runs(tmp_path, monkeypatch, capsys):
    import subprocess

    path = write(tmp_path, FULL)
    root = tmp_path / "results"
    seen = {}

    def fake_run(cmd, plan):
        seen["cmd"], seen["claimed"] = cmd, (root / G.GRID_CLAIM).exists()
        return 7

    monkeypatch.setattr(G, "_run_snakemake", fake_run)
    assert G.run_grid(path, cores=2, keep_going=False) == 7
    assert seen["claimed"] and not (root / G.GRID_CLAIM).exists()  # held during the run, released after
    plan = load_grid(path)
    assert seen["cmd"] == G.snakemake_command(plan, cores=2, profile=None, dry_run=False, keep_going=False,
                                              quiet=False, extra=[])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err == [f"nodulekit grid: 14 runs x 3 folds; output in {root}", "nodulekit grid: " + " ".join(seen["cmd"])]
    # a dry run asks Snakemake, takes no claim and writes nothing
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 5))
    assert G.run_grid(path, dry_run=True, quiet=True, extra=["-n"]) == 5
    assert calls == [G.snakemake_command(plan, cores=None, profile=None, dry_run=True, keep_going=True, quiet=True,
                                         extra=["-n"])]  # fmt: skip
    # a profile is found and its executor checked before anything runs
    profile = tmp_path / "prof"
    profile.mkdir()
    (profile / "config.yaml").write_text("executor: local\n")
    assert G.run_grid(path, profile=str(profile)) == 7
    assert seen["cmd"][seen["cmd"].index("--profile") + 1] == str(profile) and "--cores" not in seen["cmd"]


def test_run_snakemake_returns_its_status_and_cleans_up_when_interrupted(tmp_path, monkeypatch):
    import subprocess

    plan = load_grid(write(tmp_path, MINIMAL))
    assert G._run_snakemake([sys.executable, "-c", "raise SystemExit(3)"], plan) == 3
    # interrupted while waiting: the group is stopped, the dead jobs' fold claims released
    fold = plan.root / "runs/d3c/seed0/cam/fold4"
    fold.mkdir(parents=True)
    code = f"from nodulekit import claims; claims.acquire({str(fold)!r})"  # a job that died holding its fold
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (fold / "claim.json").exists()
    stopped = []
    monkeypatch.setattr("nodulekit.workers.stop_group", lambda pid, grace, leader: stopped.append((grace, leader)))
    real_popen = subprocess.Popen

    class Interrupted(real_popen):
        calls = 0

        def __init__(self, *args, **kw):
            assert kw == {"start_new_session": True}  # Ctrl-C reaches only the grid, which stops the group
            super().__init__(*args, **kw)

        def wait(self, timeout=None):
            Interrupted.calls += 1
            if Interrupted.calls == 1:
                raise KeyboardInterrupt
            return super().wait(timeout)

    monkeypatch.setattr(subprocess, "Popen", Interrupted)
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            G._run_snakemake([sys.executable, "-c", "pass"], plan)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert len(stopped) == 1 and stopped[0][0] == G.STOP_GRACE_S == 10.0
    assert not (fold / "claim.json").exists()


def test_a_yaml_error_without_a_line_is_still_one_line(tmp_path):
    # the reader's error (a control character) has no line mark and a two-line text of its own
    assert error(tmp_path, OK + "\x07table2: {architectures: cam}\n") == (
        'YAML: not valid YAML (unacceptable character #x0007: special characters are not allowed in "<unicode '
        'string>", position 33)'
    )


def test_missing_grid_dependencies_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    path = write(tmp_path, MINIMAL)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "snakemake" else real(n, *a))
    with pytest.raises(NodulekitError) as info:
        G.run_grid(path)
    assert str(info.value) == "the grid needs Snakemake: pip install 'nodulekit[grid]'"
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    with pytest.raises(NodulekitError) as info:
        load_grid(path)
    assert str(info.value) == "the grid needs the `grid` extra: pip install 'nodulekit[grid]'"


def test_a_config_that_is_not_utf8_is_named_as_the_grid_config(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_bytes(b"datasets: {d1: 1}\n\xff bad\n")
    with pytest.raises(NodulekitError) as info:
        load_grid(path)
    assert str(info.value) == f"grid config {path} is not UTF-8 text (byte 0xff on line 2); save it as UTF-8"
