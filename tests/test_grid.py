"""`nodulekit grid`: the config is checked before any job, and a tiny grid runs end to end with Snakemake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_datasets import sphere_nodules, write_rois

from nodulekit.errors import NodulekitError
from nodulekit.grid import GRID_CLAIM, load_grid, run_grid, train_command

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
TINY = """
output: out
rois: rois.h5
datasets: {d1c: 1, d3c: 3}
folds: 2
epochs: 1
train: {lr: 0.01, device: cpu, threads: 1}
model_options: {base_width: 4}
bootstrap: 50
table2:
  architectures: [cam, hesam]
  sensitivity_dataset: d3c
ablations:
  table3:
    title: "Table 3: pooling of HF / FCF"
    datasets: [d3c]
    variants:
      GAP / GAP: {arch: hesam, options: {hf_pool: avg}}
      GMP / GAP: hesam
table5: {reference: hesam, against: [cam], datasets: [d3c]}
maps: {dataset: d3c, methods: {hesam: hesam}}
"""


def write_config(folder: Path, text: str = TINY, rois: bool = True) -> Path:
    if rois and not (folder / "rois.h5").exists():
        write_rois(folder / "rois.h5", sphere_nodules(n_patients=12))
    path = folder / "grid.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


# --------------------------------------------------------------------------- the plan


def test_plan_runs_each_experiment_once(tmp_path):
    plan = load_grid(write_config(tmp_path))
    assert plan.root == tmp_path / "out"
    # Table 2 (2 x 2) + Table 3's GAP / GAP; Table 3's GMP / GAP is Table 2's HESAM on D3C
    assert sorted(plan.runs) == [
        "runs/d1c/seed0/cam+base_width=4",
        "runs/d1c/seed0/hesam+base_width=4",
        "runs/d3c/seed0/cam+base_width=4",
        "runs/d3c/seed0/hesam+base_width=4",
        "runs/d3c/seed0/hesam+base_width=4+hf_pool=avg",
    ]
    table3 = next(t for t in plan.tables if t.name == "table3")
    assert table3.rows == {"GAP / GAP": "hesam+base_width=4+hf_pool=avg", "GMP / GAP": "hesam+base_width=4"}
    assert plan.label("hesam+base_width=4+hf_pool=avg", "d3c", 0) == "Ours-HESAM (hf_pool=avg)"
    # the grid runs the package's own Snakefile
    from nodulekit.grid import snakemake_command

    cmd = snakemake_command(plan, cores=1, profile=None, dry_run=True, keep_going=False, quiet=False, extra=[])
    assert Path(cmd[cmd.index("--snakefile") + 1]).read_text().startswith("# The paper's experiment grid")
    # a dataset given as a file is used where it is, not built under datasets/
    (tmp_path / "mine.h5").write_bytes(b"")
    given = load_grid(write_config(tmp_path, edit(TINY, "d1c: 1,", "d1c: {path: mine.h5},")))
    assert given.dataset_file("d1c") == str(tmp_path / "mine.h5") and given.dataset_file("d3c") == "datasets/d3c.h5"
    # the config's epochs reach every training job
    assert plan.epochs == 1
    command = train_command(plan, "runs/d3c/seed0/cam+base_width=4", threads=1, fold=0)
    assert " --epochs 1 " in f"{command} "


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("[cam, hesam]", "[cam, hesamm]", "table2.architectures[1]: unknown model architecture 'hesamm'"),
        (
            "datasets: [d3c]\n    variants",
            "datasets: [d11c]\n    variants",
            "ablations.table3.datasets: unknown dataset 'd11c'",
        ),
        ("{hf_pool: avg}", "{hf_pol: avg}", "model 'hesam' does not take option(s) hf_pol"),
        ("{hf_pool: avg}", "{hf_pool: mean}", "option hf_pool='mean' is not one of 'max', 'avg'"),
        (
            "methods: {hesam: hesam}",
            "methods: {sam: cam}",
            "maps.methods.sam: method 'sam' does not apply to model 'cam'",
        ),
        ("epochs: 1", "epochs: 1\nepoch: 2", "unknown key(s) epoch"),
        ("epochs: 1", "epochs: 1\nepoch: 2\nlayers: 3", "unknown key(s) epoch, layers; known: ablations, bootstrap"),
        ("threads: 1}", "threads: 1, lr_steps: 3}", "train.lr_steps: unknown option"),
        ("d3c: 3}", "d3c: 4}", "datasets.d3c: must be a channel count (1, 3, 11, 21)"),
        ("rois: rois.h5", "rois: missing.h5", "rois: "),
        ("lr: 0.01", "lr: 0", "train: --lr must be a positive number (got 0)"),
        ("lr: 0.01", "lr: 0.01, momentum: 1", "train: --momentum must be in [0, 1) (got 1)"),
        ("folds: 2", "folds: 2\nfolds: 3", "line 6: not valid YAML (key 'folds' is given twice)"),
        ("{hf_pool: avg}", "{hf_pool: avg, hf_pool: max}", "not valid YAML (key 'hf_pool' is given twice)"),
        (
            "  sensitivity_dataset: d3c\n",
            "  sensitivity_dataset: d3c\n  colour: red\n",
            "table2: must be {architectures: [...], sensitivity_dataset: NAME}",
        ),
    ],
)
def test_bad_config_is_one_line_before_any_job(tmp_path, old, new, message):
    path = write_config(tmp_path, edit(TINY, old, new))
    with pytest.raises(NodulekitError) as info:
        run_grid(path, cores=1)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_cli_bad_config_and_missing_profile_exit_2(tmp_path):
    path = write_config(tmp_path)
    out = subprocess.run(
        [PY, "-m", "nodulekit", "grid", path, "--profile", "no-such-cluster"], env=ENV, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.startswith("nodulekit: error: cluster profile 'no-such-cluster' not found")
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_second_grid_on_the_same_output_refuses(tmp_path):
    path = write_config(tmp_path)
    code = f"from nodulekit import claims; import time; claims.acquire({str(tmp_path / 'out')!r}, {GRID_CLAIM!r}); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([PY, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NodulekitError, match=f"out is being run by another job \\(pid {holder.pid} on"):
            run_grid(path, cores=1)
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- end to end


def grid(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "nodulekit", "grid", config, "--cores", "2", "--quiet"], env=ENV, capture_output=True, text=True
    )


# the end-to-end grid on one dataset (each job is a process that imports torch: ~3 CPU-s); the
# report's columns for several datasets are checked without training below
END_TO_END = edit(TINY, "datasets: {d1c: 1, d3c: 3}", "datasets: {d3c: 3}")


def test_tiny_grid_end_to_end_survives_a_failed_job(tmp_path):
    """2 architectures x 1 epoch on D3C (+ an ablation, Table 5, maps), locally.

    The ablation's training is blocked by a live claim on one of its folds (as if another job
    trained it): the first run finishes everything that does not depend on it and exits 1;
    the second run trains only what is missing, keeps every finished artifact, and writes
    the report with the numbers evaluate and wilcoxon wrote.
    """
    config = write_config(tmp_path, END_TO_END)
    root = tmp_path / "out"
    blocked = root / "runs/d3c/seed0/hesam+base_width=4+hf_pool=avg"
    code = f"from nodulekit import claims; import time; claims.acquire({str(blocked / 'fold0')!r}); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([PY, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        first = grid(config)
    finally:
        holder.kill()
        holder.wait()
    assert first.returncode == 1, first.stderr[-3000:]
    assert "runs/d3c/seed0/hesam+base_width=4+hf_pool=avg/fold0 is being trained by another job" in first.stderr
    assert not (root / "report.md").exists() and not (root / "reports/table3/d3c-seed0").exists()
    finished = {p: p.stat().st_mtime_ns for p in root.glob("runs/d3c/seed0/*_width=4/**/result.h5")}
    finished |= {p: p.stat().st_mtime_ns for p in (root / "reports").rglob("*.json")}
    assert len(finished) == 2 * 2 + 2  # CAM and HESAM x 2 folds; Table 2 and Table 5

    second = grid(config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # kept, not redone
    assert sorted(p.name for p in (root / "runs/d3c/seed0").iterdir()) == [
        "cam+base_width=4",
        "hesam+base_width=4",
        "hesam+base_width=4+hf_pool=avg",
    ]
    check_report(root)
    printed = subprocess.run([PY, "-m", "nodulekit", "grid-report", config, "-o", "-"], env=ENV,
                             capture_output=True, text=True)  # fmt: skip
    assert printed.returncode == 0 and printed.stdout == (root / "report.md").read_text(), printed.stderr
    check_logs_and_printed_report(config, root)
    status = subprocess.run(
        [PY, "-m", "nodulekit", "status", *sorted(map(str, root.glob("runs/*/seed0/*")))],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert status.returncode == 0 and status.stdout.strip().endswith("6 finished")


def test_table2_puts_each_datasets_numbers_in_its_own_column(tmp_path):
    """Two datasets, hand-written evaluate records that differ per dataset and method: each cell
    is its own run's accuracy, the sensitivity columns come from `sensitivity_dataset`."""
    from nodulekit.grid_report import table2_markdown, table_cells

    (tmp_path / "rois.h5").write_bytes(b"")  # only its existence is checked when planning
    plan = load_grid(
        write_config(tmp_path, edit(TINY, "sensitivity_dataset: d3c", "sensitivity_dataset: d1c"), rois=False)
    )
    table = next(t for t in plan.tables if t.name == "table2")
    numbers = {("cam", "d1c"): 0.61, ("hesam", "d1c"): 0.72, ("cam", "d3c"): 0.83, ("hesam", "d3c"): 0.94}
    for dataset in ("d1c", "d3c"):
        runs = []
        for (arch, d), acc in numbers.items():
            if d != dataset:
                continue
            ci = {"estimate": acc, "low": acc - 0.05, "high": acc + 0.04}
            runs.append({
                "rundir": plan.run_for(f"{arch}+base_width=4", dataset, 0).rundir,
                "summary": {"accuracy": {"mean": acc, "std": acc / 10}},
                "pooled_nodule_ci": {"accuracy": ci, "sensitivity": {**ci, "estimate": acc - 0.01},
                                     "specificity": {**ci, "estimate": acc + 0.01}},
            })  # fmt: skip
        path = plan.root / plan.evaluate_report("table2", dataset, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": runs}))
    text = table2_markdown(plan, table, table_cells(plan, table, 0))
    lines = text.splitlines()
    assert lines[0] == "| Method | D1C | D3C | Sensitivity (D1C) | Specificity (D1C) |"
    assert lines[2] == (
        "| Ours-CAM | 61.00 ± 6.10 [56.0, 65.0] | 83.00 ± 8.30 [78.0, 87.0] | 0.6000 [0.560, 0.650] | 0.6200 [0.560, 0.650] |"
    )
    assert lines[3].startswith("| Ours-HESAM | 72.00 ± 7.20 [67.0, 76.0] | 94.00 ± 9.40 [89.0, 98.0] | 0.7100 [")


def check_report(root: Path) -> None:
    """The report's cells are evaluate's and wilcoxon's numbers for the right run."""
    report = (root / "report.md").read_text()
    record = json.loads((root / "report.json").read_text())
    for dataset in ("d3c",):
        runs = json.loads((root / f"reports/table2/{dataset}-seed0/table2.json").read_text())["runs"]
        hesam = next(r for r in runs if r["rundir"].endswith("/hesam+base_width=4"))
        acc = hesam["summary"]["accuracy"]
        assert record["tables"]["table2"]["0"]["Ours-HESAM"][dataset]["summary"]["accuracy"] == acc
        ci = hesam["pooled_nodule_ci"]["accuracy"]
        cell = f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"
        assert cell in report.split("## Table 3")[0]
    table3 = json.loads((root / "reports/table3/d3c-seed0/table2.json").read_text())["runs"]
    gap = next(r for r in table3 if r["rundir"].endswith("hf_pool=avg"))
    assert record["tables"]["table3"]["0"]["GAP / GAP"]["d3c"]["model_options"]["hf_pool"] == "avg"
    sens = gap["pooled_nodule_ci"]["sensitivity"]
    assert "| GAP / GAP | " in report and f"{sens['estimate']:.4f} [{sens['low']:.3f}, {sens['high']:.3f}]" in report
    wilcoxon = json.loads((root / "reports/table5/d3c-seed0.json").read_text())["rows"]
    (row,) = wilcoxon
    assert row["run_b"].endswith("cam+base_width=4")
    p = row["prob_p_value"]
    assert f"| Ours-CAM | {'<0.001' if p < 0.001 else f'{p:.3g}'} |" in report
    assert (root / "maps/d3c-seed0/figures").is_dir() and "### By nodule class" in report


def check_logs_and_printed_report(config: Path, root: Path) -> None:
    """Every job wrote its own log and benchmark table; grid-report prints what it wrote."""
    logs = sorted(str(p.relative_to(root / "logs/train")) for p in (root / "logs/train").rglob("*.log"))
    assert len(logs) == 3 * 2 and "d3c/seed0/cam+base_width=4/fold0.log" in logs  # one per training job
    blocked = (root / "logs/train/d3c/seed0/hesam+base_width=4+hf_pool=avg/fold0.log").read_text()
    assert "is being trained by another job" not in blocked and "fold 0" in blocked.lower()  # the rerun's own log
    bench = (root / "benchmarks/report.tsv").read_text().splitlines()
    assert bench[0].split("\t")[0] == "s" and float(bench[1].split("\t")[0]) > 0
    printed = subprocess.run([PY, "-m", "nodulekit", "grid-report", config], env=ENV, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == (root / "report.md").read_text()
    as_json = subprocess.run(
        [PY, "-m", "nodulekit", "grid-report", config, "--json"], env=ENV, capture_output=True, text=True
    )
    assert json.loads(as_json.stdout) == json.loads((root / "report.json").read_text())


@pytest.mark.parametrize("name, runs", [("paper.yaml", 18 * 4 + 3 + 1 + 2 * 4), ("try.yaml", 3 * 2 + 1)])
def test_the_example_configs_are_valid(tmp_path, name, runs):
    """examples/grid/*.yaml plan without error; the paper's grid trains each distinct run once."""
    (tmp_path / "rois.h5").write_bytes(b"")  # only its existence is checked before the jobs
    config = tmp_path / name
    config.write_text((REPO / "examples" / "grid" / name).read_text())
    plan = load_grid(config)
    assert len(plan.runs) == runs
    if name == "paper.yaml":
        assert [t.name for t in plan.tables] == ["table2", "table3", "fusion", "table4"]
        assert plan.table5["against"] == ["pn-samp", "sag-c", "resnet18", "resnet34", "vgg16", "densenet121"]
        assert sorted(plan.maps["methods"]) == ["cam", "gradcam", "hesam", "hesam-faithful", "sam", "sam-faithful"]


def test_dry_run_lists_one_job_per_fold_when_folds_are_not_side_by_side(tmp_path):
    config = write_config(tmp_path, edit(TINY, "threads: 1}", "threads: 1, concurrent_folds: false}"))
    out = subprocess.run([PY, "-m", "nodulekit", "grid", config, "--dry-run"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.split("Job stats:")[-1].split("Reasons:")[0]  # "rule  count" lines
    counts = dict(line.split() for line in table.splitlines() if len(line.split()) == 2 and line.split()[1].isdigit())
    # 5 runs x 2 folds; 2 datasets built; Table 2 on 2 datasets + Table 3; Table 5 on D3C; 1 map method
    assert counts == {"build": "2", "train_fold": "10", "evaluate": "3", "wilcoxon": "1", "maps": "1",
                      "scores": "1", "figures": "1", "report": "1", "all": "1", "total": "21"}  # fmt: skip
    assert not (tmp_path / "out" / "runs").exists()  # a dry run trains nothing


@pytest.mark.parametrize(
    "train, side_by_side",
    [
        ("threads: 1}", False),  # CPU jobs: one job per fold (side by side measured slower on CPU)
        ("threads: 1, gpus: 1}", False),  # GPU jobs too: side by side failed under bf16 on an H200
        ("threads: 1, gpus: 1, concurrent_folds: true}", True),  # an explicit choice wins
        ("threads: 1, concurrent_folds: true}", True),
    ],
)
def test_folds_side_by_side_only_when_asked(tmp_path, train, side_by_side):
    plan = load_grid(write_config(tmp_path, edit(TINY, "threads: 1}", train)))
    assert plan.train["concurrent_folds"] is side_by_side
    command = train_command(plan, next(iter(plan.runs)), threads=1)
    assert ("--concurrent-folds" in command) is side_by_side


def test_default_fold_layout_is_the_measured_fastest(tmp_path, monkeypatch):
    """The default follows FASTEST_FOLD_LAYOUT per machine kind (one place to change it when a
    measurement says so); today one job per fold on both."""
    import nodulekit.grid as G

    assert G.FASTEST_FOLD_LAYOUT == {"cpu": "one_job_per_fold", "gpu": "one_job_per_fold"}
    monkeypatch.setitem(G.FASTEST_FOLD_LAYOUT, "gpu", "side_by_side")
    gpu = load_grid(write_config(tmp_path, edit(TINY, "threads: 1}", "threads: 1, gpus: 1}")))
    cpu = load_grid(write_config(tmp_path, TINY))
    assert gpu.train["concurrent_folds"] is True and cpu.train["concurrent_folds"] is False
    assert "--concurrent-folds" in train_command(gpu, next(iter(gpu.runs)), threads=1)


# --------------------------------------------------------------------------- stopping a grid

LONG = """
output: out
rois: rois.h5
datasets: {d1c: 1}
folds: 2
epochs: 2000
train: {lr: 0.01, device: cpu, threads: 1}
model_options: {base_width: 4}
bootstrap: 50
table2:
  architectures: [cam]
  sensitivity_dataset: d1c
"""


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (walks the parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_stops_the_grid_its_jobs_and_their_claims_within_seconds(tmp_path, signum, code):
    from reliability_cases import BY_ID

    path = write_config(tmp_path, LONG)
    out = tmp_path / "out"
    with open(tmp_path / "grid.log", "w") as log:
        # Ctrl-C's default disposition, as in a terminal: a suite started in the background by a
        # shell inherits SIGINT ignored, and the grid rightly keeps an inherited "ignore"
        grid = subprocess.Popen(
            [PY, "-m", "nodulekit", "grid", path, "--cores", "1"],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("runs/*/*/*/fold*/checkpoint.pt")):  # a train job is in its epochs
            assert grid.poll() is None, (tmp_path / "grid.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training started"
            time.sleep(0.1)
        assert list(out.glob("runs/*/*/*/fold*/claim.json")) and (out / GRID_CLAIM).exists()
        jobs = descendants(grid.pid)
        assert any("train" in Path(f"/proc/{p}/cmdline").read_text() for p in jobs if running(p))
        started = time.monotonic()
        grid.send_signal(signum)  # SIGINT: as Ctrl-C in a terminal sends it to the grid
        status = grid.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        grid.kill()
        grid.wait()
    log = (tmp_path / "grid.log").read_text()
    if signum == signal.SIGTERM:
        BY_ID["grid-terminated"].check(status, log)
    assert status == code and "Traceback" not in log, log[-3000:]
    # jobs get STOP_GRACE_S (10 s) to unwind before SIGKILL: well under 20 s even on a loaded
    # machine (measured 6-14 s at load 20 on 2 cores; the old grid waited up to 120 s)
    assert took < 20, f"the grid took {took:.1f} s to stop"
    time.sleep(0.5)
    assert not [p for p in jobs if running(p)], "a job outlived the grid"
    assert not list(out.rglob("claim.json")) and not (out / GRID_CLAIM).exists()
