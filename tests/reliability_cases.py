"""The catalogue of bad inputs and faults that nodulekit is tested against (docs/reliability.md).

Each :class:`Case` is one row of the catalogue: what goes wrong, the line the user sees
(``{...}`` stands for a path or number that varies) and the exit status. The tests in
tests/test_reliability.py check every case's real output against ``sees`` (as a pattern)
and ``exit``, and tests/test_reliability.py::test_catalogue_is_current checks that
docs/reliability.md shows exactly these rows. After changing a case, regenerate the table:

    python tests/reliability_cases.py docs/reliability.md
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    id: str
    fault: str  # the bad input or fault, as a user would describe it
    sees: str  # the line printed on stderr ("" when the command succeeds); {x} varies
    exit: int
    issue: str = ""  # the defect of issue 11 ("3") or item of issue 20 ("20.3") it fixed ("" if already right)

    def pattern(self) -> re.Pattern:
        parts = re.split(r"\{[^}]*\}", self.sees)
        return re.compile(".*?".join(re.escape(p) for p in parts))

    def check(self, code: int, stderr: str) -> None:
        """Assert the real exit status and that the last stderr line is the catalogued one."""
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        assert code == self.exit, f"{self.id}: exit {code}, expected {self.exit}; stderr: {stderr[-2000:]}"
        if self.sees:
            assert lines, f"{self.id}: nothing on stderr"
            assert self.pattern().fullmatch(lines[-1]), f"{self.id}: {lines[-1]!r} is not {self.sees!r}"
            assert "Traceback" not in stderr, f"{self.id}: a traceback reached the user"


E = "nodulekit: error: "
CASES = [
    Case(
        "stdout-link",
        "`-o` names a link to a FIFO, device or /dev/stdout (text output, e.g. `cohort`)",
        "",
        0,
        "14",
    ),
    Case("stdout-dash", "`-o -` for a text output", "", 0, "14"),
    Case("link-to-file", "`-o` names a symbolic link to a regular file", "", 0, "14"),
    Case(
        "binary-to-stream",
        "`-o -` or a FIFO for a binary artifact (HDF5, ONNX, checkpoint)",
        E + "-o {path}: {where}; this output is binary, give a file path",
        2,
        "14",
    ),
    Case(
        "extract-locked",
        "a second `extract` into an `-o` that another `extract` is writing",
        E + "{out} is being written by another nodulekit extract job (pid {pid} on {host}); "
        "wait for it or choose another -o",
        2,
        "1",
    ),
    Case(
        "output-appeared",
        "the output file appears (another job) while a run is working, without `--overwrite`",
        E + "{out} already exists: it appeared while this run was working (pass --overwrite to replace it)",
        2,
        "1",
    ),
    Case(
        "nan-voi",
        "a NIfTI VOI with NaN voxels (some or all)",
        E + "{n} scan(s)/VOI(s) skipped (listed above); re-run with --overwrite to retry only those",
        1,
        "2",
    ),
    Case(
        "full-disk-extract",
        "the disk fills up during `extract`",
        E + "could not write {path}: No space left on device{kept}",
        1,
        "3",
    ),
    Case("full-disk-maps", "the disk fills up while `maps` writes", E + "could not write {out}: {reason}", 1, "3"),
    Case(
        "full-disk-train",
        "the disk fills up while `train` saves a checkpoint",
        E + "could not write {checkpoint}: No space left on device",
        1,
        "3",
    ),
    Case(
        "full-disk-build",
        "the disk fills up while `build` writes",
        E + "could not write {out}: No space left on device",
        1,
        "3",
    ),
    Case(
        "full-disk-evaluate",
        "the disk fills up while `evaluate` writes its report (no partial report is left)",
        E + "could not write {file}: No space left on device",
        1,
        "3",
    ),
    Case("fold-overwrite", "`train --fold K --overwrite` on a run with other finished folds", "", 0, "4"),
    Case(
        "fold-overwrite-settings",
        "`train --fold K --overwrite` with other settings while other folds hold results",
        E + "{rundir} holds {folds} made with other settings; --overwrite with --fold replaces only the folds "
        "asked for and the run would mix settings: drop --fold to replace the whole run, or use a new -o RUNDIR",
        2,
        "4",
    ),
    Case(
        "wrong-dataset",
        "`scores` or `figures` given a dataset other than the maps' (nodule ids overlap)",
        E + "{dataset} is not the dataset of {maps}: images or labels differ: {what}",
        2,
        "5",
    ),
    Case(
        "changed-input",
        "an input file changes between an interrupted `extract` and its resumption",
        "",
        0,
        "6",
    ),
    Case("kill-parent", "`kill -9` of a command running worker processes", "", 0, "7"),
    Case(
        "truncated-hdf5",
        "a truncated HDF5 input (dataset, rois, maps, fold result)",
        E + "{file} is not a readable HDF5 file: truncated (an interrupted copy or write?)",
        2,
        "8",
    ),
    Case(
        "figures-bad-scores",
        "`figures --scores` naming a file that is not a scores table (or no file)",
        E + "{csv} is not a scores table from `nodulekit scores` (no column {columns})",
        2,
        "9",
    ),
    Case(
        "foreign-onnx-graph",
        "`infer` on an ONNX file with nodulekit metadata but another graph",
        E + "{model}: the graph does not match its nodulekit metadata: {why}",
        2,
        "10",
    ),
    Case(
        "hidden-temp-only",
        "a RUNDIR holding only a hidden temporary file of an interrupted `train`",
        "",
        0,
        "11",
    ),
    Case(
        "file-as-rundir",
        "a regular file given where a RUNDIR is expected",
        E + "{file} is a file, not a nodulekit run folder (give the RUNDIR that `nodulekit train -o` made)",
        2,
        "12",
    ),
    Case(
        "foreign-checkpoint",
        "a checkpoint that is a text file, truncated, or holds arbitrary Python objects",
        E + "{file} is not a readable nodulekit checkpoint: {why}",
        2,
        "12",
    ),
    Case(
        "output-is-folder",
        "`-o` naming an existing folder where a file is written",
        E + "-o {path} is a folder; give a file name",
        2,
        "12",
    ),
    Case("stale-temps", "hidden temporary files left by a killed save, export or extract", "", 0, "13"),
    Case(
        "existing-output",
        "`-o` naming an existing file without `--overwrite`",
        E + "{out} already exists (pass --overwrite to replace it)",
        2,
    ),
    Case(
        "flag-with-value",
        "a flag given a value (`--overwrite true`)",
        "Error: Got unexpected extra argument(s) (true)",
        2,
    ),
    Case("interrupted", "Ctrl-C", E + "interrupted; finished work is kept and a re-run resumes", 130),
    # issue 20: outputs never replace inputs (item 2)
    Case(
        "output-is-input",
        "`-o` is one of the command's inputs, also through a symbolic or hard link, with or without "
        "`--overwrite` (`infer m.onnx d.h5 -o d.h5`, `scores maps.h5 -o maps.h5`)",
        E + "-o {out} is the input {in}: an output never replaces an input (even with --overwrite); choose another -o",
        2,
        "20.2",
    ),
    Case(
        "output-inside-input",
        "`-o` inside a RUNDIR that is an input (`maps RUN -o RUN/fold0/result.h5`, "
        "`export-onnx RUN --fold 1 -o RUN/fold1/checkpoint.pt`)",
        E + "-o {out} lies inside the input folder {in}: an output never replaces an input (even with --overwrite); "
        "choose another -o",
        2,
        "20.2",
    ),
    Case(
        "output-holds-input",
        "a folder `-o` that holds an input (`predict -o` the folder of its model and scan, `--overwrite`)",
        E + "-o {out} holds the input {in}: an output never replaces an input (even with --overwrite); "
        "choose another -o",
        2,
        "20.2",
    ),
    # folder outputs (item 3)
    Case(
        "folder-appeared",
        "the `predict -o` folder appears (the user, another job) while predict runs, without `--overwrite`",
        E + "{out} already exists: it appeared while this run was working (pass --overwrite to replace it)",
        2,
        "20.3",
    ),
    Case(
        "folder-second-writer",
        "a second `predict` into an `-o` folder that another `predict` is writing",
        E + "{out} is being written by another nodulekit predict job (pid {pid} on {host}); "
        "wait for it or choose another -o",
        2,
        "20.3",
    ),
    Case(
        "folder-link",
        "`-o` a symbolic link to a folder, with `--overwrite` (twice)",
        "",
        0,
        "20.3",
    ),
    Case(
        "folder-stale-temps", "the `.NAME.*.part/` folder and lock of a `predict` killed with `kill -9`", "", 0, "20.3"
    ),
    Case(
        "folder-dash",
        "`-o -` where the output is a folder (`predict`, `figures`, `train`, `phantom`)",
        E + "-o -: this output is a folder; give a folder path, not a stream or -",
        2,
        "20.3",
    ),
    # locks and claims (item 4)
    Case(
        "link-as-lock",
        "a lock or claim file planted as a symbolic link (`.out.h5.lock`, `fold0/claim.json` -> a user's file)",
        E + "{path} is a symbolic link, not a nodulekit {lock or claim} file: remove it (never followed)",
        2,
        "20.4",
    ),
    Case(
        "claim-other-namespace",
        "a live job in another PID namespace, same host name (a container), holds the fold",
        E + "{fold} is being trained by another job (pid {pid} on {host} since {time}); it is taken over once "
        "untouched for 10 min, or delete {claim} if that job is gone",
        2,
        "20.4",
    ),
    # grid stops when told (item 5)
    Case(
        "grid-terminated",
        "`grid` sent SIGTERM (a scheduler) or Ctrl-C while its jobs run",
        E + "terminated; finished work is kept and a re-run resumes",
        143,
        "20.5",
    ),
    # printing (items 7, 8) and the smaller findings about outputs
    Case(
        "terminal-escape",
        "an escape sequence in a dataset name or in ONNX model metadata (`evaluate`, `describe`)",
        "",
        0,
        "20.7",
    ),
    Case("progress-not-a-terminal", "stderr is not a terminal (a log file): no progress bars", "", 0, "20.8"),
    Case(
        "read-only-output",
        "`-o` in a read-only folder (found before the work)",
        E + "-o {out}: cannot write in {folder}: {reason}",
        2,
        "20.8",
    ),
    Case(
        "link-loop",
        "`-o` a loop of symbolic links",
        E + "-o {out}: a loop of symbolic links (it points back at itself)",
        2,
        "20.8",
    ),
    Case("ascii-locale", "an ASCII locale (`PYTHONIOENCODING=ascii`) and non-ASCII text or paths", "", 0, "20.8"),
    Case(
        "stdout-closed",
        "standard output closed (`>&-`) where the data goes there (`-o -`, `predict`)",
        E + "{what}standard output is closed{why}",
        2,
        "20.8",
    ),
]
# issue 20, item 6: bad input refused at the door (tests/test_input_validation.py)
CASES += [
    Case(
        "dicom-no-rescale",
        "a DICOM series without RescaleSlope/RescaleIntercept (stored values, not HU)",
        E + "{file} lacks RescaleSlope/RescaleIntercept: its stored values are not Hounsfield units "
        "(a CT image must carry them)",
        2,
        "20.6",
    ),
    Case(
        "dicom-slope-zero", "RescaleSlope 0", E + "{file} has RescaleSlope 0 and RescaleIntercept {b}: no HU", 2, "20.6"
    ),
    Case(
        "dicom-foreign-slice",
        "a PT (or other non-CT) slice inside a CT series",
        E + "{file} is a PT image inside the CT series of {folder}; give a series of CT slices only",
        2,
        "20.6",
    ),
    Case(
        "dicom-spacing",
        "an implausible slice spacing (1e6 mm) or pixel spacing, in any format",
        E + "{folder} has an implausible voxel size of 1e+06 mm (a CT's lie in 0.01-20 mm)",
        2,
        "20.6",
    ),
    Case(
        "hu-padding",
        "stored values without the rescale (lung at +150) in a field of view padded at -1024",
        E + "{scan}: intensities do not look like CT Hounsfield units ({p} % of non-padding voxels between -1100 "
        "and -500 HU, where a chest CT's lung and air lie); is it another modality, a mask, or raw stored "
        "values without the rescale slope/intercept?",
        2,
        "20.6",
    ),
    Case(
        "nifti-nan-affine",
        "a NIfTI whose affine holds NaN",
        E + "scan {path} has a voxel-to-world affine with NaN or infinite entries",
        2,
        "20.6",
    ),
    Case(
        "nifti-singular",
        "a NIfTI with a singular affine",
        E + "scan {path} has a singular voxel-to-world affine (voxel sizes {sizes} mm)",
        2,
        "20.6",
    ),
    Case(
        "nifti-rgb",
        "an RGB NIfTI",
        E + "scan {path} holds colour (RGB) voxels, not grey values; a CT has one number per voxel",
        2,
        "20.6",
    ),
    Case(
        "mhd-no-raw",
        "a MetaImage (`.mhd`) whose `.raw` is missing",
        E + "scan {path}: its voxel data file {name} is missing (expected beside it)",
        2,
        "20.6",
    ),
    Case(
        "no-reader",
        "a MetaImage or NRRD scan without SimpleITK installed",
        E + "scan {path} is {format}; reading it needs SimpleITK: pip install 'nodulekit[itk]'",
        2,
        "20.6",
    ),
    Case(
        "unknown-format",
        "a scan in a format no registered reader takes (e.g. a PNG)",
        E + "scan {path} is not a format nodulekit reads (accepted: {formats})",
        2,
    ),
    Case(
        "mask-folder", "a folder given as `--mask`", E + "mask {path} is a folder; give a file ({formats})", 2, "20.6"
    ),
    Case(
        "mask-other-space",
        "a `--mask` covering another physical space than the scan (another voxel order of the same space is "
        "reoriented)",
        E + "mask {path} is not on the scan's grid: it covers another physical space ({how})",
        2,
    ),
    Case(
        "csv-latin1",
        "a `--nodules` CSV (or VOI manifest) in Latin-1",
        E + "nodules CSV {path} is not UTF-8 text (byte {b} on line {n}); save it as UTF-8",
        2,
        "20.6",
    ),
    Case(
        "csv-duplicate-column",
        "a CSV with a column twice",
        E + "nodules CSV {path} has the column {name} twice",
        2,
        "20.6",
    ),
    Case("csv-bom", 'a UTF-8 CSV with a byte-order mark (Excel\'s "CSV UTF-8")', "", 0, "20.6"),
    Case(
        "diameter-tiny",
        "a diameter below 1 mm (1e-9 mm); under 3 mm a warning",
        E + "--diameter: diameter 1e-09 mm is not in [1, 100] mm",
        2,
        "20.6",
    ),
    Case(
        "voi-not-ct",
        "`extract --vois` with a VOI whose image is not CT (a mask file); reported and skipped, the rest written",
        E + "{n} scan(s)/VOI(s) skipped (listed above); re-run with --overwrite to retry only those",
        1,
        "20.6",
    ),
    Case(
        "yaml-latin1",
        "a grid YAML in Latin-1 (with a BOM it is read)",
        E + "grid config {path} is not UTF-8 text (byte {b} on line {n}); save it as UTF-8",
        2,
        "20.6",
    ),
    # issue 20, item 6: what enters a run (tests/test_run_checks.py)
    Case(
        "train-bad-value",
        "`train --momentum -1` (or 1), `train`/`build --seed -1` or `--seed 2**66`",
        E + "--{option} must be {rule} (got {value})",
        2,
        "20.6",
    ),
    Case(
        "checkpoint-of-another-run",
        "a fold checkpoint of another run (architecture, channels, options or dataset) copied into a RUNDIR",
        E + "{checkpoint} is not a checkpoint of {rundir}: its {what} is {found}, run.json says {recorded}",
        2,
        "20.6",
    ),
    Case("run-json-dataset-path", "an older run.json whose `dataset` is the dataset's path", "", 0, "20.6"),
    Case(
        "onnx-unloadable",
        "an ONNX model this onnxruntime cannot load (e.g. a newer opset)",
        E + "{model}: this onnxruntime {version} cannot load the model: {why}",
        2,
        "20.6",
    ),
    Case(
        "grid-duplicate-key",
        "a grid YAML with a key given twice (PyYAML would keep the last silently), or `lr: 0`",
        E + "{config}: line {n}: not valid YAML (key {key} is given twice)",
        2,
        "20.6",
    ),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"

BEGIN, END = "<!-- catalogue: begin -->", "<!-- catalogue: end -->"


def table() -> str:
    """The catalogue as the Markdown table of docs/reliability.md."""
    rows = [
        "| case | bad input or fault | what the user sees (stderr) | exit | issue 11 defect / issue 20 item |",
        "|---|---|---|---|---|",
    ]
    for c in CASES:
        code = f"`` {c.sees} ``" if "`" in c.sees else f"`{c.sees}`"  # a span that may hold backticks
        sees = code if c.sees else "(works: the output is written correctly)"
        rows.append(f"| `{c.id}` | {c.fault} | {sees} | {c.exit} | {c.issue or '–'} |")
    return "\n".join(rows) + "\n"


def rewrite(doc: Path) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{BEGIN}\n{table()}{END}{tail}")


if __name__ == "__main__":
    rewrite(Path(sys.argv[1]))
