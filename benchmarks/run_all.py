"""``make bench``: run nodulekit's speed benchmarks and write ``benchmarks/out/*.json`` + ``benchmarks/RESULTS.md``.

Every measurement runs in its own subprocess (``benchmarks/speed.py``), so each peak
memory figure (``ru_maxrss``) is that measurement's alone. The whole run keeps to a wall
clock budget (default 14 minutes, for the 15-minute limit on a 2-core CPU): measurements
run in order of importance and the ones that no longer fit are recorded as skipped, never
silently dropped. Every JSON file and the Markdown summary record the machine (CPU model,
cores, GPU if any, load average) and the git commit.

    python benchmarks/run_all.py                      # synthetic D11C-sized input
    python benchmarks/run_all.py --d11c ../shared/d11c.h5
    python benchmarks/run_all.py --smoke              # tiny model, ~2 min: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SPEED = HERE / "speed.py"
EXECUTION_COST = HERE / "execution_cost.py"


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = (
        _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
        if shutil.which("nvidia-smi")
        else ""
    )
    versions = json.loads(
        _run(
            [
                sys.executable,
                "-c",
                (
                    "import json, torch, onnxruntime as o; print(json.dumps({'torch': torch.__version__, "
                    "'onnxruntime': o.__version__, 'ort_providers': o.get_available_providers(), "
                    "'torch_threads': torch.get_num_threads(), 'cuda': torch.cuda.is_available()}))"
                ),
            ]
        )
        or "{}"
    )
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "gpu": gpu or "none",
        "gpu_note": ""
        if gpu
        else "no GPU on this machine; the GPU machine was not available in this session, so no GPU figures",
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def git_info() -> dict:
    commit = _run(["git", "rev-parse", "HEAD"]) or "unknown"
    dirty = [
        line[3:]
        for line in _run(["git", "status", "--porcelain", "--", "nodulekit", "benchmarks"]).splitlines()
        if line[3:] not in ("benchmarks/RESULTS.md",)
    ]
    return {
        "commit": commit,
        "dirty": bool(dirty),
        "dirty_files": dirty,
        "note": f"plus uncommitted changes at run time in {', '.join(dirty)}" if dirty else "",
    }


def plan(args, tmp: Path) -> list[tuple[str, object, float]]:
    """(name, speed.py arguments or a function of the context giving them, time cap in s), most important first."""
    w = ["--width", str(args.width)]
    d = ["--d11c", args.d11c] if args.d11c else []
    onnx = ["--onnx", str(tmp / "hesam.onnx")]
    small = ["--n-train", "64", "--n-test", "16"] if args.smoke else []
    steps = ["--steps", "2" if args.smoke else "6", "--min-time", "1" if args.smoke else "40"]
    big = ["--batches", "1", "64", "256"] if args.smoke else []

    def th(ctx):
        return ["--threads", str(ctx["threads"])]

    def step_variants(ctx):
        # bf16 joins the interleaved run only if the probe saw it pay at all on this CPU.
        extra = ["bf16"] if ctx.get("bf16_pays") else []
        return ["train-steps", "--variants", "eager", "channels_last", *extra, *w, *d, *small, *th(ctx), *steps]

    # execution variants and real epochs of `nodulekit train` (refuses to start on a busy machine)
    cost = [str(EXECUTION_COST), *(["--d11c", args.d11c] if args.d11c else [])]
    cost += ["--width", "8", "--n", "96", "--epochs", "1", "--steps", "1", "--allow-busy"] if args.smoke else []
    return [
        ("probe-threads", ["probe-threads", *w], 120),
        ("execution-cost", cost, 480),
        ("extract-nodulekit", ["extract-nodulekit", "--lidc-root", args.lidc_root], 240),
        ("extract-pylidc", ["extract-pylidc", "--lidc-root", args.lidc_root], 240),
        ("export", lambda ctx: ["export", *w, *onnx, *th(ctx)], 240),
        ("infer", lambda ctx: ["infer", "--engines", "torch", "ort", *w, *onnx, *th(ctx), *big], 500),
        ("train-steps", step_variants, 300),
        (
            "infer-memory-torch",
            lambda ctx: ["infer", "--engines", "torch", *w, *th(ctx), "--batches", "256" if args.smoke else "1024"],
            200,
        ),
        (
            "infer-memory-ort",
            lambda ctx: [
                "infer",
                "--engines",
                "ort",
                *w,
                *onnx,
                *th(ctx),
                "--batches",
                "256" if args.smoke else "1024",
            ],
            200,
        ),
        (
            "train-steps-compile",
            lambda ctx: [
                "train-steps",
                "--variants",
                "eager",
                "compile",
                *w,
                *d,
                *small,
                *th(ctx),
                "--steps",
                "2",
                "--min-time",
                "0",
            ],
            600,
        ),
    ]


def run_all(args) -> dict:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    machine, git = machine_info(), git_info()
    started = time.time()
    deadline = started + args.budget_s
    record = {
        "machine": machine,
        "git": git,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "budget_s": args.budget_s,
        "smoke": args.smoke,
        "d11c": args.d11c,
        "loadavg_start": os.getloadavg(),
        "results": {},
    }
    ctx = {"threads": os.cpu_count() or 1, "bf16_pays": False}
    for name, argv, cap in plan(args, tmp):
        remaining = deadline - time.time()
        entry: dict = {"machine": machine, "git": git}
        if remaining < min(cap, 60):
            entry.update(status="skipped", reason=f"time budget: {remaining:.0f} s of {args.budget_s:.0f} s left")
        else:
            argv = argv(ctx) if callable(argv) else argv
            json_path = out / f"{name}.json"
            json_path.unlink(missing_ok=True)
            script, argv = (argv[0], argv[1:]) if argv[0].endswith(".py") else (str(SPEED), argv)
            cmd = [sys.executable, script, *argv, "--json", str(json_path)]
            print(f"[bench] {name} (cap {min(cap, remaining):.0f} s) ...", flush=True)
            t0 = time.time()
            load0 = os.getloadavg()
            env = dict(os.environ)
            if "compile" in name:
                # A fresh inductor cache: an earlier run's cached kernels would hide the compile cost.
                env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{os.getpid()}")
            try:
                proc = subprocess.run(
                    cmd, cwd=REPO, capture_output=True, text=True, timeout=min(cap, remaining), env=env
                )
                rc, tail = proc.returncode, (proc.stderr or "").strip().splitlines()[-3:]
            except subprocess.TimeoutExpired:
                rc, tail = None, [f"timed out after {min(cap, remaining):.0f} s"]
            wall = time.time() - t0
            entry.update(command=" ".join(cmd[1:]), wall_s=wall, loadavg_start=load0)
            if rc == 0 and json_path.exists():
                entry.update(status="ok", **json.loads(json_path.read_text()))
            else:
                entry.update(status="failed" if rc is not None else "timeout", returncode=rc, stderr_tail=tail)
            print(f"[bench] {name}: {entry['status']} in {wall:.0f} s", flush=True)
        if name == "probe-threads" and entry.get("status") == "ok":
            ctx["threads"] = entry["best_threads"]
            ctx["bf16_pays"] = entry["bf16_vs_fp32"] > 1.0
        (out / f"{name}.json").write_text(json.dumps(entry, indent=2, default=str))
        record["results"][name] = entry
    shutil.rmtree(tmp, ignore_errors=True)
    record["wall_s"] = time.time() - started
    record["loadavg_end"] = os.getloadavg()
    record["threads_used"] = int(ctx["threads"])
    record["bf16_in_step_run"] = bool(ctx["bf16_pays"])
    (out / "summary.json").write_text(json.dumps(record, indent=2, default=str))
    return record


# ----------------------------------------------------------------------------- Markdown


def _ok(r: dict, name: str) -> dict | None:
    e = r["results"].get(name) or {}
    return e if e.get("status") == "ok" else None


def _status(r: dict, name: str) -> str:
    e = r["results"].get(name) or {}
    return f"{e.get('status', 'not run')}" + (
        f" ({e.get('reason') or '; '.join(e.get('stderr_tail') or [])})" if e.get("status") != "ok" else ""
    )


def _f(v, nd=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}" if v >= 0.01 else f"{v:.2g}"
    return str(v)


def render(r: dict) -> str:
    m, g = r["machine"], r["git"]
    L = []
    L.append("# nodulekit speed benchmarks" + (" (SMOKE RUN: tiny model, harness check only)" if r["smoke"] else ""))
    L.append("")
    L.append(
        f"Written by `make bench` (`benchmarks/run_all.py`) on {r['started']}; raw figures in `benchmarks/out/*.json`."
    )
    L.append("")
    L.append(
        f"- **Machine**: {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
        f"{m['memory_gb']} GB RAM; GPU: {m['gpu']}. {m['gpu_note']}."
    )
    L.append(
        f"- **Software**: Python {m['python']}, torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')} "
        f"(providers {', '.join(m.get('ort_providers', []))})."
    )
    L.append(f"- **Commit**: `{g['commit']}`" + (f" ({g['note']})" if g["dirty"] else ""))
    L.append(
        f"- **Load**: 1-min load average {r['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} at end "
        f"(on a {m['logical_cores']}-core machine shared with other jobs, figures are lower bounds of what an idle "
        "machine gives, and ratios measured in the same run are more meaningful than absolute numbers)."
    )
    L.append(
        f"- **Input**: {'real D11C `' + r['d11c'] + '`' if r['d11c'] else 'synthetic D11C-sized data (11 x 32 x 32; uniform [0, 1] tensors for the step and inference figures, the ring/blob test dataset for the real epochs)'}; model: HESAM, base_width {'8 (smoke)' if r['smoke'] else '64 (the paper model, 7.0 M parameters)'}."
    )
    L.append(f"- Whole run: {r['wall_s']:.0f} s of a {r['budget_s']:.0f} s budget.")
    L.append("")

    probe = _ok(r, "probe-threads")
    L.append("## Threads and bf16 (probe)")
    L.append("")
    if probe:
        by = ", ".join(f"{k} thread(s): {v:.2f} s" for k, v in probe["step_s_by_threads"].items())
        L.append(
            f"One HESAM training step (forward + backward) at batch {probe['batch']}: {by}. The PyTorch and ONNX "
            f"Runtime figures below use **{r['threads_used']} intra-op thread(s)** (the faster here), except "
            "*Execution variants*, which uses torch's default as `nodulekit train` does. With more "
            "threads than free cores, PyTorch's OpenMP workers wait on each other and a step can be several times "
            "slower than with one thread."
        )
        L.append("")
        L.append(
            f"bf16 autocast, same step at batch {probe['batch']}: {probe['bf16_step_s']:.2f} s, i.e. "
            f"{probe['bf16_vs_fp32']:.2f}x the fp32 speed; this CPU {'has' if probe['native_bf16'] else 'has no'} "
            "native bf16 instructions (avx512_bf16/amx_bf16). bf16 at batch 32 and in real epochs, every variant "
            "at the thread count `nodulekit train` uses: *Execution variants* below."
        )
    else:
        L.append(f"Probe: {_status(r, 'probe-threads')}; using {r['threads_used']} thread(s).")
    L.append("")

    L.append("## Training throughput (HESAM, batch 32, SGD)")
    L.append("")
    L.append(
        "| variant | threads | first step (s) | median step (s) | samples/s | vs eager (same run) | one epoch (s, extrapolated) |"
    )
    L.append("|---|---|---|---|---|---|---|")
    rows = []
    for name in ("train-steps", "train-steps-compile"):
        e = _ok(r, name)
        if not e:
            rows.append(
                f"| {name.replace('train-steps', 'variants') or name} | – | – | – | – | – | {_status(r, name)} |"
            )
            continue
        base = e["variants"].get("eager")
        for v, x in e["variants"].items():
            if name == "train-steps-compile" and v == "eager":
                continue
            ratio = x["samples_per_s"] / base["samples_per_s"] if base else None
            rows.append(
                f"| {v} | {e['threads']} | {_f(x['first_step_s'])} | {_f(x['step_s_median'])} | "
                f"{_f(x['samples_per_s'])} | {_f(ratio)}x | {_f(x['epoch_s_extrapolated'])} |"
            )
    L.extend(rows)
    L.append("")
    st, cp = _ok(r, "train-steps"), _ok(r, "train-steps-compile")
    best = "eager"
    if st:
        base = st["variants"]["eager"]
        for v, x in st["variants"].items():
            if (
                x["loss_finite"]
                and x["samples_per_s"] >= 1.05 * base["samples_per_s"]
                and (best == "eager" or x["samples_per_s"] > st["variants"][best]["samples_per_s"])
            ):
                best = v
    L.append(
        "The variants are timed **round-robin in one process** (one step of each per round, same batches), "
        "so they share the machine's load and their ratio is fair; compile is timed against eager the same "
        "way in its own process. Median of the steps after the first; the first step includes warm-up and, "
        "for `compile`, compilation. One epoch = ceil(660 / 32) = 21 steps x median step. "
        f"Peak RSS: {_f(st and st['maxrss_mb'])} MB for the process holding all variants"
        + (f", {_f(cp['maxrss_mb'])} MB with compile" if cp else "")
        + "."
    )
    L.append("")
    compile_note = ""
    if cp:
        c, e0 = cp["variants"]["compile"], cp["variants"]["eager"]
        extra, gain = c["first_step_s"] - e0["first_step_s"], e0["step_s_median"] - c["step_s_median"]
        speed = e0["step_s_median"] / c["step_s_median"]
        best_speed = (st["variants"][best]["samples_per_s"] / st["variants"]["eager"]["samples_per_s"]) if st else 1.0
        if speed >= 1.05 * best_speed and gain > 0 and extra / gain < 90 * 5 * 21:
            best = "compile"
        compile_note = (
            f"`torch.compile` costs {extra:.0f} s once (measured with an empty inductor cache); "
            f"per step it is {speed:.2f}x eager"
            + (
                f", so it pays back after {extra / gain:.0f} steps ({extra / gain / 21:.1f} epochs)."
                if gain > 0
                else ", so it never pays back."
            )
        )
    L.append(
        f"**Fastest of these fp32 variants here: {best}** (>= 5 % more samples/s than eager in the same run; compile only if its "
        "one-off cost is recovered within a 5-fold x 90-epoch run). " + compile_note
    )
    L.append("")
    cost = _ok(r, "execution-cost")
    if cost:
        import execution_cost

        L.append(execution_cost.render(cost))
    else:
        L.append("## Execution variants and the cost of the paper's schedule (`execution_cost.py`)")
        L.append("")
        L.append(f"Status: {_status(r, 'execution-cost')}.")
    L.append("")

    L.append("## Inference with maps (prob + map 16x16 + map_up 32x32), PyTorch eager vs ONNX Runtime (CPU)")
    L.append("")
    inf = _ok(r, "infer")
    if inf:
        ti, oi = inf["batches"].get("torch"), inf["batches"].get("ort")
        L.append("| batch | PyTorch samples/s | ONNX Runtime samples/s | ORT / PyTorch | timed calls (each) |")
        L.append("|---|---|---|---|---|")
        for b in sorted({int(b) for e in (ti, oi) if e for b in e}):
            t = ti.get(str(b)) if ti else None
            o = oi.get(str(b)) if oi else None
            ratio = o["samples_per_s"] / t["samples_per_s"] if (t and o) else None
            L.append(
                f"| {b} | {_f(t and t['samples_per_s'])} | {_f(o and o['samples_per_s'])} | "
                f"{_f(ratio)}{'x' if ratio else ''} | {t['reps'] if t else o['reps']} |"
            )
        L.append("")
        L.append(
            f"Both engines ran **round-robin in one process** ({inf['threads']} intra-op thread(s) each; one call "
            "of each per round on the same batch), so they share the machine's load. Median call time; batches "
            "<= 64 after one warm-up call each and timed for at least 2 s; larger batches timed once after the "
            "smaller ones warmed the engines up."
        )
    else:
        L.append(f"Status: {_status(r, 'infer')}.")
    mt, mo = _ok(r, "infer-memory-torch"), _ok(r, "infer-memory-ort")
    big_b = "256" if r["smoke"] else "1024"
    L.append("")
    L.append(
        f"Peak RSS at batch {big_b}, each engine alone in its own process (interpreter, model and one call): "
        f"PyTorch {_f(mt and mt['maxrss_mb'])} MB, ONNX Runtime {_f(mo and mo['maxrss_mb'])} MB"
        + (
            ""
            if (mt and mo)
            else f" (PyTorch {_status(r, 'infer-memory-torch')}, ORT {_status(r, 'infer-memory-ort')})"
        )
        + "."
    )
    ex = _ok(r, "export")
    if ex:
        v = ex["verification"]
        worst = max(x["map_max_abs_diff"] for k, x in v.items() if k.startswith("batch"))
        L.append("")
        L.append(
            f"Export (`export_onnx`, {ex['exporter']} exporter, including the ONNX Runtime check): {ex['export_and_check_s']:.1f} s, "
            f"{ex['onnx_bytes'] / 2**20:.1f} MiB, max |dmap| vs PyTorch {worst:.2g}."
        )
    else:
        L.append(f"Export: {_status(r, 'export')}.")
    L.append("")

    L.append("## Extraction from DICOM (`../shared/data/lidc-dicom`, 2 scans)")
    L.append("")
    en, epl = _ok(r, "extract-nodulekit"), _ok(r, "extract-pylidc")
    L.append("| what | s / scan (first pass) | s / scan (second pass, page cache warm) | peak RSS (MB) |")
    L.append("|---|---|---|---|")
    if en:
        L.append(
            f"| nodulekit `sources.read_scan` (volume only) | {_f(en['read_scan_s_per_scan_cold'])} | "
            f"{_f(en['read_scan_s_per_scan_warm'])} | {_f(en['maxrss_after_read_mb'])} |"
        )
    if epl:
        L.append(
            f"| pylidc `Scan.to_volume()` (volume only) | {_f(epl['to_volume_s_per_scan_cold'])} | "
            f"{_f(epl['to_volume_s_per_scan_warm'])} | {_f(epl['maxrss_mb'])} |"
        )
    if en:
        L.append(
            f"| `nodulekit extract` (`extract_rois`, whole stage) | {_f(en['extract_s_per_scan'])} | – | {_f(en['maxrss_mb'])} |"
        )
    L.append("")
    if en and epl:
        ratio = epl["to_volume_s_per_scan_warm"] / en["read_scan_s_per_scan_warm"]
        same = all(epl["equal_to_read_scan"].values())
        L.append(
            f"Volume reading: pylidc / nodulekit time = {ratio:.2f}x (warm). The two volumes are "
            f"{'identical (every HU voxel equal)' if same else 'NOT identical: ' + json.dumps(epl['equal_to_read_scan'])} "
            f"for {', '.join(epl['equal_to_read_scan'])}."
        )
    L.append("")
    L.append(
        "What is compared: pylidc's own `Scan.to_volume()` (reads every `.dcm` of the series folder with pydicom, "
        "drops duplicate z positions, sorts by z, stacks `pixel_array * RescaleSlope + RescaleIntercept` in float "
        "and casts to int16) with only `get_path_to_dicom_files` pointed at the series folder (pylidc finds it "
        "through `~/.pylidcrc`, which this machine does not have), against nodulekit's `sources.read_scan` (headers "
        "first, series found by UID, the same duplicate rule, HU written slice by slice into an int16 volume). The "
        "whole `extract` row adds pylidc's annotation queries and consensus masks, the 1 mm resampling of the "
        "nodule windows and the HDF5 writes, for the labelled nodules of both scans "
        f"({en['nodules_extracted'] if en else '?'} nodules). Status: nodulekit {_status(r, 'extract-nodulekit')}, "
        f"pylidc {_status(r, 'extract-pylidc')}."
    )
    L.append("")
    L.append("## Not measured")
    L.append("")
    L.append(
        "- GPU: " + (m["gpu_note"] or "see the GPU rows above") + ". `nodulekit infer --provider cuda` "
        "(IO binding) and TensorRT are implemented but were not run here."
    )
    skipped = [n for n, e in r["results"].items() if e.get("status") != "ok"]
    L.append(
        "- Skipped or failed here: "
        + (", ".join(f"{n} ({_status(r, n)})" for n in skipped) if skipped else "none")
        + "."
    )
    L.append("")
    L.append(
        "LIDC-IDRI data: Armato III et al. (2015), *Data From LIDC-IDRI*, The Cancer Imaging Archive, "
        "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX, CC BY 3.0."
    )
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run nodulekit's speed benchmarks (make bench).")
    p.add_argument("-o", "--output", default=str(HERE / "out"), help="folder for the JSON files [benchmarks/out]")
    p.add_argument(
        "--results", default=None, help="Markdown summary [benchmarks/RESULTS.md; smoke: OUT/RESULTS.smoke.md]"
    )
    p.add_argument("--d11c", default=None, help="real D11C dataset artifact for the training figures (else synthetic)")
    p.add_argument("--lidc-root", default=str(REPO.parent / "shared" / "data" / "lidc-dicom"))
    p.add_argument("--budget-s", type=float, default=840.0, help="wall-clock budget for the whole run [840 s]")
    p.add_argument(
        "--smoke", action="store_true", help="tiny HESAM (base_width 8) and data: checks the harness, not speed"
    )
    args = p.parse_args(argv)
    args.width = 8 if args.smoke else 64
    if args.d11c and not Path(args.d11c).exists():
        p.error(f"--d11c {args.d11c} does not exist")
    record = run_all(args)
    results = (
        Path(args.results)
        if args.results
        else (Path(args.output) / "RESULTS.smoke.md" if args.smoke else HERE / "RESULTS.md")
    )
    results.write_text(render(record))
    print(f"[bench] wrote {results} and {args.output}/*.json in {record['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
