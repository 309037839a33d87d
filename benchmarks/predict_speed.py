"""Speed of ``nodulekit predict`` on one scan: nodules per second for 1, 100 and 1,000 nodules.

Each run is one ``nodulekit.predict.predict`` call (the library function behind the
command, in this process) on one DICOM series with N nodules from a CSV, split into
reading the scan, building the N inputs (extract's window + build's resampling) and running
the model (ONNX Runtime), after loading the model (session creation and the file's checks). Models: the paper's HESAM (base_width 64, D11C input) as one
model and as a 5-fold ensemble in one graph (``export-onnx --ensemble``); random weights,
since speed does not depend on them. Centres are drawn uniformly inside the scan (seeded),
diameters uniformly in 4..30 mm.

    python benchmarks/predict_speed.py                         # ../shared/data LIDC-IDRI-0001, CPU
    python benchmarks/predict_speed.py --provider cuda         # on a machine with onnxruntime-gpu
    python benchmarks/predict_speed.py --counts 1,100 --members 1 --width 8   # quick check
    python benchmarks/predict_speed.py --model-only --provider cuda          # patches/s, batch 1/64/1024

``--model-only`` times the model alone on random patches (no scan, no input building):
patches per second *with maps* (the exported graph's probability, map and upsampled map) at
batch sizes ``--batches`` (1, 64, 1024), PyTorch eager on the provider's device vs ONNX
Runtime; on ``--provider cuda`` ONNX Runtime runs with IO binding (inputs copied to the GPU
once per batch, outputs allocated there by ORT). Without CUDA (no ``CUDAExecutionProvider``
in onnxruntime, or no GPU for torch) ``--provider cuda`` is refused in one line, exit 2.

Writes ``benchmarks/out/predict.json`` (with the machine, its load and the git commit) and
prints a Markdown table. Like ``execution_cost.py`` it refuses to start on a busy machine
(1-min load above 0.75 x cores) unless ``--allow-busy``, which flags the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def default_scan() -> Path | None:
    root = Path(os.environ.get("NODULEKIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "lidc-dicom"
    found = sorted(root.glob("LIDC-IDRI-0001/*/*"))
    return found[0] if found else None


def make_models(folder: Path, width: int, members: list[int]) -> dict[int, Path]:
    """One ONNX file per ensemble size (1 = a single model), seeded random HESAM weights."""
    import torch

    from nodulekit.export import ModelSource, export_onnx
    from nodulekit.models import create_model

    out = {}
    for k in members:
        models = []
        for i in range(k):
            torch.manual_seed(i)
            models.append(create_model("hesam", 11, base_width=width).eval())
        info = [{"fold": i, "epoch": None} for i in range(k)]
        src = ModelSource(
            models[0], "benchmark: random weights", 0, None, {}, members=models if k > 1 else [], member_info=info
        )
        path = folder / f"hesam{width}-x{k}.onnx"
        export_onnx(src, path, exporter="torchscript", n_check=2)
        out[k] = path
    return out


def write_nodules(scan_path: Path, n: int, seed: int, path: Path) -> Path:
    """N nodules: centres uniform over the scan's central 80 % (LPS mm), diameters uniform 4..30 mm."""
    from nodulekit.scans import read_scan

    scan = read_scan(scan_path)
    rng = np.random.default_rng(seed)
    shape = np.array(scan.volume.shape, float)
    lines = ["id,x,y,z,diameter_mm"]
    for i in range(n):
        rck = (0.1 + 0.8 * rng.random(3)) * (shape - 1)
        x, y, z = scan.voxel_to_lps(rck)
        lines.append(f"n{i},{x:.3f},{y:.3f},{z:.3f},{rng.uniform(4, 30):.2f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(model: Path, scan: Path, csv: Path, provider: str, repeats: int) -> dict:
    from nodulekit.predict import predict

    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = predict(model, scan, nodules=csv, provider=provider)
        total = time.perf_counter() - t0
        runs.append({**res.timings, "total_s": total, "engine": res.engine})
    med = {
        k: statistics.median(r[k] for r in runs) for k in ("load_model_s", "read_s", "inputs_s", "model_s", "total_s")
    }
    return {**med, "engine": runs[0]["engine"], "repeats": repeats}


def cuda_missing() -> str | None:
    """Why CUDA cannot be timed here (one line), or None when both ONNX Runtime and torch have it."""
    import onnxruntime as ort
    import torch

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers or not torch.cuda.is_available():
        return (
            f"CUDA is not available on this machine (onnxruntime {ort.__version__} providers: {', '.join(providers)}; "
            f"torch {torch.__version__} sees {'a' if torch.cuda.is_available() else 'no'} GPU); nothing measured"
        )
    return None


def _timed(fn, sync, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_throughput(model_path: Path, width: int, batches: list[int], patches: int, provider: str, repeats: int):
    """Patches per second with maps, per batch size: PyTorch eager vs ONNX Runtime (IO binding on CUDA)."""
    import torch

    from nodulekit.export import inference_module, make_session, run_session
    from nodulekit.models import create_model

    device = torch.device("cuda" if provider == "cuda" else "cpu")
    torch.manual_seed(0)
    eager = inference_module(create_model("hesam", 11, base_width=width).eval()).to(device).eval()
    session, ran, _ = make_session(model_path, provider)
    x = np.random.default_rng(0).standard_normal((patches, 11, 32, 32)).astype(np.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for batch in batches:
        n = max(patches - patches % batch, batch)
        xs = np.resize(x, (n, *x.shape[1:]))

        def run_eager():
            with torch.inference_mode():
                for start in range(0, n, batch):
                    out = eager(torch.from_numpy(xs[start : start + batch]).to(device))
                    [t.cpu() for t in out]  # the probabilities and maps back on the host, as predict needs them

        def run_ort():
            run_session(session, xs, batch, binding_device="cuda" if ran != "cpu" else None)

        for engine, fn in (("pytorch eager", run_eager), (f"onnxruntime {ran}", run_ort)):
            seconds = _timed(fn, sync, repeats)
            rows.append(
                {"engine": engine, "batch": batch, "patches": n, "seconds": seconds, "patches_per_s": n / seconds}
            )
    return rows


def render_model_only(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"model only (HESAM base_width {record['width']}, D11C, with maps), provider {record['provider']}, "
        f"{record.get('cuda_device') or m.get('cpu')}, torch {record['torch']}, onnxruntime {record['onnxruntime']}, "
        f"1-min load {record['load']['loadavg_before'][0]:.1f} before / {record['load']['loadavg_after'][0]:.1f} after, "
        f"commit {record['git'].get('commit', '?')[:10]}",
        *(f"**Not publishable: {f}.**" for f in record["flags"]),
        "",
        "| engine | batch | patches | seconds (median) | patches/s |",
        "|---|---|---|---|---|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['engine']} | {r['batch']} | {r['patches']} | {r['seconds']:.3f} | {r['patches_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scan", type=Path, default=None, help="DICOM series folder or NIfTI (default: shared LIDC-IDRI-0001)"
    )
    ap.add_argument("--counts", default="1,100,1000")
    ap.add_argument("--members", default="1,5", help="ensemble sizes to time (1 = one model)")
    ap.add_argument("--width", type=int, default=64, help="HESAM base_width (64 = the paper's)")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    ap.add_argument("--repeats", type=int, default=3, help="runs per count below 1000 (1000: one run)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "predict.json")
    ap.add_argument("--max-load", type=float, default=None, help="refuse above this 1-min load [0.75 x cores]")
    ap.add_argument("--allow-busy", action="store_true", help="run on a busy machine anyway; figures are flagged")
    ap.add_argument("--model-only", action="store_true", help="time the model alone at --batches (eager vs ORT)")
    ap.add_argument("--batches", default="1,64,1024", help="batch sizes of --model-only")
    ap.add_argument("--patches", type=int, default=4096, help="patches per timed run of --model-only")
    args = ap.parse_args(argv)
    if args.provider == "cuda" and (missing := cuda_missing()) is not None:
        print(f"predict_speed: {missing}", file=sys.stderr)
        return 2
    if args.model_only:
        return main_model_only(args)
    scan = args.scan or default_scan()
    if scan is None:
        print("no scan: pass --scan or put the shared data in ../shared/data", file=sys.stderr)
        return 2
    from execution_cost import LoadWatch
    from run_all import git_info, machine_info

    watch, flags, git = LoadWatch(), [], git_info()  # the commit measured is the one at the start
    if busy(watch, args, flags):
        return 2
    counts = [int(c) for c in args.counts.split(",")]
    members = [int(m) for m in args.members.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = make_models(tmp, args.width, members)
        for k, model in models.items():
            for n in counts:
                csv = write_nodules(scan, n, seed=n, path=tmp / f"n{n}.csv")
                r = measure(model, scan, csv, args.provider, 1 if n >= 1000 else args.repeats)
                r.update(members=k, nodules=n, nodules_per_s=n / r["total_s"], model_nodules_per_s=n / r["model_s"])
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
    load = watch.finish()
    if load["other_processes_cores"] is not None and load["other_processes_cores"] > 0.25:
        flags.append(f"other processes used {load['other_processes_cores']:.2f} cores on average during the run")
    record = {
        "benchmark": "predict",
        "scan": scan.name,
        "width": args.width,
        "provider": args.provider,
        "machine": machine_info(),
        "git": git,
        "load": load,
        "flags": flags,
        "results": results,
    }
    save(record, args.out)
    print(render(record))
    return 0


def busy(watch, args, flags: list) -> bool:
    """True (after one line on stderr) when the machine is too loaded to time and --allow-busy is
    not given; with --allow-busy the load is flagged in the record instead."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    max_load = args.max_load if args.max_load is not None else 0.75 * cores
    if watch.load_before[0] <= max_load:
        return False
    message = f"1-min load average {watch.load_before[0]:.2f} is above {max_load:g} on {cores} cores"
    if not args.allow_busy:
        print(f"predict_speed: refused: {message}; wait for an idle machine or pass --allow-busy", file=sys.stderr)
        return True
    flags.append(message)
    return False


def save(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


def main_model_only(args) -> int:
    """``--model-only``: patches/s with maps per batch size, eager vs ONNX Runtime; JSON to --out."""
    import onnxruntime as ort
    import torch
    from execution_cost import LoadWatch
    from run_all import git_info, machine_info

    watch, flags, git = LoadWatch(), [], git_info()
    if busy(watch, args, flags):
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_models(Path(tmp), args.width, [1])[1]
        results = model_throughput(model, args.width, batches, args.patches, args.provider, args.repeats)
    load = watch.finish()
    record = {
        "benchmark": "predict_model_only",
        "width": args.width,
        "provider": args.provider,
        "machine": machine_info(),
        "cuda_device": torch.cuda.get_device_name() if args.provider == "cuda" else None,
        "torch": str(torch.__version__),
        "onnxruntime": ort.__version__,
        "git": git,
        "load": load,
        "flags": flags,
        "results": results,
    }
    save(record, args.out)
    print(render_model_only(record))
    return 0


def render(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"`predict` on {record['scan']} ({record['provider']}, HESAM base_width {record['width']}, D11C), "
        f"{m.get('cpu')}, {m.get('usable_cores')} usable cores, 1-min load {record['load']['loadavg_before'][0]:.1f} "
        f"before / {record['load']['loadavg_after'][0]:.1f} after, commit {record['git'].get('commit', '?')[:10]}"
        + (" (+ uncommitted changes)" if record["git"].get("dirty") else ""),
        *(f"**Not publishable: {f}.**" for f in record["flags"]),
        "",
        "| models | nodules | load model (s) | read scan (s) | build inputs (s) | run model (s) | total (s) | nodules/s | run model only, nodules/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['members']} | {r['nodules']} | {r['load_model_s']:.2f} | {r['read_s']:.2f} | {r['inputs_s']:.2f} | {r['model_s']:.2f} | "
            f"{r['total_s']:.2f} | {r['nodules_per_s']:.1f} | {r['model_nodules_per_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
