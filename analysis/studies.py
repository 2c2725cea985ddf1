"""Shared runner of the studies in ``analysis/study_*.py``: a grid of training runs, one
directory each, resumable, collected into one ``runs.csv``.

Every run is one call of :func:`kernelgeo.train.train` (the same training loop as
``kernelgeo train``) writing to ``<study folder>/runs/<name>/``.  With ``resume=True`` a run
whose ``summary.json`` says it completed is skipped, an interrupted one continues from its
checkpoint (bit-identical to an uninterrupted run), and a run that diverged (``diverged.json``)
is not retried.  Checkpoints are deleted once a run has finished, so a study folder holds only
metrics, summaries and figures.

A study that needs a measurement between epochs (per-layer gradient norms) passes
``after_epoch``: the runner then trains one epoch per call (``stop_after=1`` and ``resume``),
calls ``after_epoch(run, model, data, epoch)`` on the model restored from the checkpoint, and
stores the returned values in ``runs/<name>.epoch_extra.json`` (beside the run); epochs already
measured are not measured again on resume.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernelgeo import constrain  # noqa: E402
from kernelgeo.data import load_dataset  # noqa: E402
from kernelgeo.manifolds import parse_geometry  # noqa: E402
from kernelgeo.models import get_model  # noqa: E402
from kernelgeo.train import TrainConfig, train  # noqa: E402
from kernelgeo.training import machine_info  # noqa: E402
from kernelgeo.training.loaders import default_model  # noqa: E402

__all__ = ["Run", "run_grid", "collect", "write_csv", "CSV_COLUMNS", "load_rows",
           "mean_std", "t_interval", "machine_line", "restore_model", "run_name", "extra_file"]

#: columns every study's runs.csv starts with (study-specific tags follow)
CSV_COLUMNS = ["study", "dataset", "model", "geometry", "step_rule", "seed", "lr", "epochs",
               "final_test_error", "best_test_error", "final_train_loss", "time_per_epoch",
               "max_constraint_error", "final_train_error", "epochs_done", "status",
               "schedule", "optimizer", "train_images", "test_images", "run"]


@dataclass
class Run:
    """One training run of a study: its directory name, configuration and extra CSV columns."""

    name: str
    cfg: TrainConfig
    tags: dict[str, Any] = field(default_factory=dict)


def run_name(*parts: Any) -> str:
    """A directory name from parts (geometry slugs, ``lr0.1``, ``s0``...)."""
    out = []
    for p in parts:
        s = str(p)
        if ":" in s or "," in s:
            s = parse_geometry(s).slug()
        out.append(s.replace("/", "-").replace(" ", ""))
    return "_".join(out)


def _data_key(cfg: TrainConfig) -> tuple:
    return (cfg.dataset, cfg.data_dir, cfg.split_seed, cfg.train_subset, cfg.test_subset,
            cfg.image_size)


class _DataCache:
    """Decode each data set once for the whole grid (Fashion-MNIST takes seconds)."""

    def __init__(self):
        self._cache: dict[tuple, Any] = {}

    def get(self, cfg: TrainConfig):
        key = _data_key(cfg)
        if key not in self._cache:
            self._cache[key] = load_dataset(
                cfg.dataset, cfg.data_dir, split_seed=cfg.split_seed,
                train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                image_size=cfg.image_size)
        return self._cache[key]


def restore_model(cfg: TrainConfig, data, state: dict) -> torch.nn.Module:
    """The model of a checkpoint ``state`` (built and constrained as the training loop does)."""
    model = get_model(cfg.model or default_model(data), data.num_classes, data.in_channels)
    constrain(model, parse_geometry(cfg.geometry).constrain_spec(), on_invalid="skip",
              include_linear=cfg.include_linear)
    model.load_state_dict(state["model"])
    return model


def _read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=float)
    os.replace(tmp, path)


def _finished(rd: Path) -> str | None:
    """``"completed"``/``"diverged"`` for a finished run directory, else ``None``."""
    if (rd / "diverged.json").exists():
        return "diverged"
    if (rd / "summary.json").exists() and _read_json(rd / "summary.json").get("completed"):
        return "completed"
    return None


def extra_file(rd: Path) -> Path:
    """Where the ``after_epoch`` values of run directory ``rd`` are kept (beside it: the
    training loop refuses to start in a directory holding other files)."""
    return rd.parent / f"{rd.name}.epoch_extra.json"


def _train_one(run: Run, rd: Path, data, resume: bool,
               after_epoch: Callable | None, log) -> None:
    base = replace(run.cfg, out=str(rd), resume=resume or rd.exists(), checkpoint=True,
                   quiet=True, progress=False)
    if after_epoch is None:
        train(base, data=data)
        return
    extra_path = extra_file(rd)
    extra = _read_json(extra_path) if extra_path.exists() else {}
    if "0" not in extra:
        # the initial model: built exactly as train() builds it (seed, then model, then geometry)
        from kernelgeo.training.environment import seed_all

        seed_all(run.cfg.seed)
        model = get_model(run.cfg.model or default_model(data), data.num_classes,
                          data.in_channels)
        constrain(model, parse_geometry(run.cfg.geometry).constrain_spec(), on_invalid="skip",
                  include_linear=run.cfg.include_linear)
        extra["0"] = after_epoch(run, model, data, 0)
        extra_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(extra_path, extra)
    while True:
        summary = train(replace(base, resume=True, stop_after=1), data=data)
        done = summary["epochs_done"]
        state = torch.load(rd / "checkpoint.pt", map_location="cpu", weights_only=False)
        model = restore_model(run.cfg, data, state)
        extra[str(done)] = after_epoch(run, model, data, done)
        _write_json(extra_path, extra)
        if summary["completed"]:
            return


def _claim(claims: Path | None, name: str) -> bool:
    """Take run ``name`` for this process (``True``), or learn that another worker of the same
    launch has (``False``): an exclusive create in the launch's claims folder."""
    if claims is None:
        return True
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run_grid(study: str, runs: Sequence[Run], folder: str | Path, *, resume: bool = False,
             after_epoch: Callable | None = None, log=print,
             write: bool = True, claims: Path | None = None) -> list[dict]:
    """Train every run of ``runs`` into ``folder/runs/<name>`` and write ``folder/runs.csv``.

    Parameters
    ----------
    study : str
        Name written into the ``study`` column.
    runs : sequence of Run
        Names must be unique.
    folder : path
        The study folder.
    resume : bool
        Skip finished runs, continue interrupted ones.  Without it, an existing run directory
        is an error (nothing is overwritten).
    after_epoch : callable, optional
        ``after_epoch(run, model, data, epoch) -> JSON-able``, called on the initial model
        (epoch 0) and after every epoch.
    log : callable
    write : bool
        Write ``runs.csv`` (``False`` in a worker process running part of the grid: the
        parent collects).
    claims : path, optional
        Folder shared by the workers of one launch: a run is trained by the first worker
        that claims it there, so runs of different lengths keep every worker busy.

    Returns
    -------
    list of dict
        The rows of ``runs.csv`` (with the summaries under ``"_summary"``).
    """
    folder = Path(folder)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique")
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    cache = _DataCache()
    for i, run in enumerate(runs, 1):
        rd = folder / "runs" / run.name
        state = _finished(rd)
        if state is not None and resume:
            log(f"[{i}/{len(runs)}] {run.name}: {state}, skipped")
            continue
        if not _claim(claims, run.name):
            continue
        if rd.exists() and not resume:
            raise FileExistsError(f"{rd} exists: pass --resume to continue the study, or "
                                  "use another --out")
        t0 = time.perf_counter()
        try:
            _train_one(run, rd, cache.get(run.cfg), resume, after_epoch, log)
            status = "completed"
        except FloatingPointError as err:
            _write_json(rd / "diverged.json", {"error": str(err)})
            status = "diverged"
        ck = rd / "checkpoint.pt"
        if ck.exists():
            ck.unlink()  # results only: a finished run is never continued
        log(f"[{i}/{len(runs)}] {run.name}: {status} in {time.perf_counter() - t0:.1f}s")
    rows = collect(study, runs, folder)
    if write:
        write_csv(rows, folder / "runs.csv")
    return rows


def launch_workers(script: str | Path, argv: list[str], k: int) -> int:
    """Start ``k`` copies of ``script`` with ``argv --resume --worker i/k``; wait for all.

    Each worker takes the next run of the grid that no other worker has claimed (claims
    live in a temporary folder of this launch, so an interrupted launch leaves none behind
    for the next) and writes no ``runs.csv`` (the parent collects).  Returns the largest exit
    status.
    """
    procs = []
    with tempfile.TemporaryDirectory(prefix="kg-claims-") as claims:
        env = dict(os.environ, KERNELGEO_STUDY_CLAIMS=claims)
        for i in range(k):
            cmd = [sys.executable, str(Path(script).resolve()), *argv, "--resume",
                   "--worker", f"{i}/{k}"]
            procs.append(subprocess.Popen(cmd, env=env))
            time.sleep(1.0)  # stagger the data decoding (and CUDA start-up)
        return max(p.wait() for p in procs)


def add_concurrency(parser, help: str) -> None:
    """``--concurrent K`` (runs trained at once, one worker process each) and the hidden
    ``--worker i/k`` that :func:`dispatch` passes to the workers."""
    import argparse

    parser.add_argument("--concurrent", type=int, default=1, help=help)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def dispatch(study: str, runs: Sequence[Run], folder: Path, args, argv: list[str],
             script: str | Path, parser) -> list[dict] | None:
    """What a study script does with its grid, by its arguments: a worker (``--worker i/k``)
    trains its share and returns ``None``; ``--report-only`` collects; ``--concurrent K > 1``
    starts K workers and collects; otherwise the grid is trained here.  Returns the rows
    (``runs.csv`` written)."""
    if args.concurrent < 1:
        parser.error("--concurrent must be >= 1")
    if args.worker is not None:
        i, k = (int(x) for x in args.worker.split("/"))
        claims = os.environ.get("KERNELGEO_STUDY_CLAIMS")
        # without a claims folder (a worker started by hand), a fixed share of the grid
        run_grid(study, runs if claims else runs[i::k], folder, resume=True, write=False,
                 claims=Path(claims) if claims else None)
        return None
    if not args.report_only and args.concurrent == 1:
        return run_grid(study, runs, folder, resume=args.resume)
    if not args.report_only:
        taken = [r.name for r in runs if (folder / "runs" / r.name).exists()]
        if taken and not args.resume:
            parser.error(f"{folder / 'runs'} already holds {len(taken)} of these runs: pass "
                         "--resume to continue the study, or use another --out")
        worker_argv = [a for a in argv if a != "--resume"]
        rc = launch_workers(script, worker_argv, min(args.concurrent, len(runs)))
        if rc:
            print(f"a worker exited with status {rc}; runs.csv holds the finished runs")
    rows = collect(study, runs, folder)
    write_csv(rows, folder / "runs.csv")
    return rows


def _history(rd: Path) -> list[dict]:
    p = rd / "metrics.jsonl"
    if not p.exists():
        return []
    with open(p) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def collect(study: str, runs: Iterable[Run], folder: str | Path) -> list[dict]:
    """One row per finished run of ``runs`` found under ``folder/runs``."""
    folder = Path(folder)
    rows = []
    for run in runs:
        rd = folder / "runs" / run.name
        cfg = run.cfg
        base = {"study": study, "dataset": cfg.dataset, "model": cfg.model,
                "geometry": str(cfg.geometry), "step_rule": cfg.step_rule, "seed": cfg.seed,
                "lr": cfg.lr, "epochs": cfg.epochs, "schedule": cfg.schedule,
                "optimizer": cfg.optimizer, "run": run.name}
        state = _finished(rd)
        if state == "completed":
            s = _read_json(rd / "summary.json")
            hist = s.get("history", [])
            base.update({
                "model": s["model"], "step_rule": s["step_rule"],
                "final_test_error": s["final_test_error"],
                "best_test_error": s["best_test_error"],
                "final_train_loss": s["final_train_loss"],
                "final_train_error": hist[-1]["train_error"] if hist else None,
                "time_per_epoch": s["time_per_epoch"],
                "max_constraint_error": s["max_constraint_error"],
                # runs of versions that did not measure it have no path length
                "path_length": s.get("path_length"),
                "epochs_done": s["epochs_done"], "status": "completed",
                "train_images": s["train_images"], "test_images": s["test_images"],
                "_summary": s})
        elif state == "diverged":
            hist = _history(rd)
            base.update({"status": "diverged", "epochs_done": len(hist),
                         "final_test_error": math.nan, "best_test_error": math.nan,
                         "final_train_loss": math.nan, "final_train_error": math.nan,
                         "_summary": {"geometry": str(cfg.geometry), "history": hist}})
        else:
            continue
        base.update(run.tags)
        rows.append(base)
    return rows


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write ``rows`` (private ``_`` keys dropped) with :data:`CSV_COLUMNS` first."""
    path = Path(path)
    extra = [k for r in rows for k in r if k not in CSV_COLUMNS and not k.startswith("_")]
    cols = CSV_COLUMNS + list(dict.fromkeys(extra))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    os.replace(tmp, path)
    return path


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a ``runs.csv`` with numbers parsed."""
    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = int(v) if v.lstrip("-").isdigit() else float(v)
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (``ddof=1``; 0 for one value) and count."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of paired differences.

    Returns ``(mean, lo, hi)``; ``lo = hi = nan`` with fewer than two differences.
    """
    from scipy import stats

    a = np.asarray(diffs, dtype=float)
    m = float(a.mean()) if a.size else math.nan
    if a.size < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - half, m + half


def _describe_machine(info: dict) -> str:
    return (f"{info.get('gpu') + ', ' if info.get('gpu') else ''}"
            f"{info.get('cpu', info.get('processor', '?'))}, {info.get('cpu_count', '?')} "
            f"logical cores (shared), torch {info.get('torch', '?')}, "
            f"python {info.get('python', '?')}")


def machine_line(rows: Sequence[dict] | None = None) -> str:
    """``GPU, CPU (n cores), torch x, python y`` of the machine(s) that trained ``rows`` (from
    their summaries; several are listed), else of this process's machine."""
    seen = []
    for r in rows or ():
        info = (r.get("_summary") or {}).get("machine")
        if info and _describe_machine(info) not in seen:
            seen.append(_describe_machine(info))
    return "; ".join(seen) if seen else _describe_machine(machine_info())


def date_line(rows: Sequence[dict] | None = None) -> str:
    """When the runs of ``rows`` finished (from their summaries, UTC) and when the report was
    written: a report rebuilt with ``--report-only`` keeps the training dates."""
    from datetime import datetime, timezone

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ends = []
    for r in rows or ():
        d = (r.get("_summary") or {}).get("date")
        try:
            ends.append(datetime.strptime(d, "%Y-%m-%d %H:%M:%S %z").astimezone(timezone.utc))
        except (TypeError, ValueError):
            continue
    if not ends:
        return now
    a, b = min(ends), max(ends)
    span, last = f"{a:%Y-%m-%d %H:%M}", f"{b:%Y-%m-%d %H:%M}"
    if last != span:  # the end as a time alone on the same day
        span += " to " + (last[11:] if last[:10] == span[:10] else last)
    return f"runs finished {span} UTC; report written {now}"


def command_line() -> str:
    """The command that reproduces the study, for report.md: this process's command line,
    with ``--report-only`` (which trains nothing) replaced by ``--resume``."""
    args = [a for a in sys.argv[1:] if a != "--report-only"]
    if "--report-only" in sys.argv[1:] and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", sys.argv[0], *args])


def base_parser(description: str, default_out: str):
    """Arguments every study takes: ``--out``, ``--resume``, ``--seeds``, ``--epochs``,
    ``--threads``, ``--report-only``."""
    import argparse

    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out, help="study folder (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="skip finished runs, continue interrupted ones")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild runs.csv, figures and report.md from the runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    return p
