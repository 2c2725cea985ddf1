"""Command-line interface: ``kernelgeo {train,compare,demo,analyze}``, or ``python -m kernelgeo``.

Examples::

    kernelgeo demo                                   # 5 geometries on digits, ~1 min on a CPU
    kernelgeo train --dataset digits --geometry sphere --epochs 20 --name sphere
    kernelgeo train --dataset cifar10-jpeg --model resnet20 \\
        --geometry 'layer1.*=sphere,layer3.*=stiefel,*=euclidean' --out runs/train/mixed
    kernelgeo train --out runs/train/mixed --resume ...   # continue an interrupted run exactly
    kernelgeo compare --dataset digits --geometries euclidean sphere stiefel --seeds 0 1 2
    torchrun --nproc_per_node 2 -m kernelgeo train ...   # data-parallel (see --help epilog)

Output folders: every command writes to ``--out``, by default ``runs/<command>/<name>`` with
``<name>`` from ``--name`` or the start time.  An existing non-empty ``--out`` is continued
with ``--resume`` (train, compare), moved aside to ``<out>.old-<time>`` with ``--force``, and
otherwise refused.

Bad names, values and option combinations exit with status 2 and a one-line message; missing
data, an unreadable checkpoint, a full disk or a diverged run exit with status 1 and say where
and why.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .training.config import (
    AMP_MODES,
    AUGMENTATIONS,
    DEFAULT_STEP_RULE,
    OPTIMIZERS,
    SCHEDULES,
    STEP_RULES,
    ConfigError,
    TrainConfig,
    check_field,
)

__all__ = ["main", "build_parser"]

OUTPUT_HELP = """output folders:
  Every command writes to --out, by default runs/<command>/<name>, <name> being --name or the
  start time (runs/train/20261129-204500).  An existing non-empty --out is never overwritten:
  --resume continues the run in it (train, compare), --force first renames it to
  <out>.old-<time>; otherwise the command stops with an error and changes nothing."""


def _arg_dataset(s: str) -> str:
    from .data import check_dataset_name

    try:
        return check_dataset_name(s)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _arg_model(s: str) -> str:
    from .models import check_model_name

    try:
        return check_model_name(s)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _arg_geometry(s: str):
    """argparse type: the parsed :class:`~kernelgeo.manifolds.GeometrySpec` (built once)."""
    from .manifolds import GeometryError, parse_geometry

    try:
        return parse_geometry(s)
    except GeometryError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _field(name: str, convert=int):
    """argparse type for the :class:`TrainConfig` field ``name``: convert, then the field's
    own check (:func:`kernelgeo.training.config.check_field`)."""
    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}") from None
        try:
            return check_field(name, v)
        except ConfigError as err:
            # "--lr must be a finite number > 0, got inf" -> argparse's "argument --lr: ..."
            raise argparse.ArgumentTypeError(
                "expected " + str(err).split(" must be ", 1)[-1]) from None
    return parse


def _check(ok, what: str, convert=int):
    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s}")
        return v
    return parse


_pos_int = _check(lambda v: v >= 1, "a positive integer")


def _add_output(p: argparse.ArgumentParser, command: str, *, resume: bool,
                with_out: bool = True) -> None:
    g = p.add_argument_group("output")
    if with_out:
        g.add_argument("--out", default=None, metavar="DIR",
                       help=f"output directory (default: runs/{command}/<--name or start "
                            "time>)")
    g.add_argument("--name", default=None,
                   help=f"name of the default output directory runs/{command}/NAME")
    g.add_argument("--force", action="store_true",
                   help="if --out holds earlier results, rename them to <out>.old-<time> "
                        "first (nothing is deleted)")
    if resume:
        g.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoint.pt (exactly, incl. "
                            "RNG states; every setting that changes the result must be the "
                            "same)")


def _add_common(p: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    """Options shared by ``train`` and ``compare`` (everything but geometry/seed/out)."""
    d = {"dataset": "digits", "epochs": 10, "batch_size": 128, "lr": 0.1, **(defaults or {})}
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=_arg_dataset, default=d["dataset"],
                   help="digits (offline default), cifar10-jpeg, cifar10-tiny, cifar10, "
                        "cifar100, mnist, fashion-mnist, folder:<path> (default: %(default)s)")
    g.add_argument("--data-dir", default=None,
                   help="directory searched first for data files and used for --download "
                        "(also: $KERNELGEO_DATA, ../shared/data)")
    g.add_argument("--download", action="store_true",
                   help="download torchvision data sets (cifar10/100, mnist, fashion-mnist)")
    g.add_argument("--train-subset", type=_field("train_subset"), default=None, metavar="N",
                   help="train on a stratified subset of N images")
    g.add_argument("--test-subset", type=_field("test_subset"), default=None, metavar="N",
                   help="evaluate on a stratified subset of N test images")
    g.add_argument("--split-seed", type=_field("split_seed"), default=0,
                   help="seed of the fixed train/test split (digits) and of subsets, in "
                        "[0, 2**32) (default: %(default)s)")
    g.add_argument("--image-size", type=_field("image_size"), default=None,
                   help="resize the shorter side of every image to this size, then "
                        "centre-crop (aspect ratio kept; default: keep the size)")
    g.add_argument("--workers", type=_field("workers"), default=None,
                   help="data-loading worker processes for streaming folders")
    g.add_argument("--augment", default="auto", choices=AUGMENTATIONS,
                   help="auto: crop+flip for >=16px colour images, crop only for characters, "
                        "none for 8x8 digits")
    g.add_argument("--crop-padding", type=_field("crop_padding"), default=None,
                   help="zero padding of the random crop, >= 0 (default: image size / 8)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", type=_arg_model, default=None,
                   help="resnet20/32/44/56/110 (option-A shortcuts; -b for option B), "
                        "wrn-D-K, resnet-digits, torchvision:<name> "
                        "(default: resnet-digits for 8x8 images, else resnet20)")
    g.add_argument("--include-linear", action="store_true",
                   help="also put nn.Linear weights (rows = output units) on the geometry")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="rsgd",
                   help="rsgd: kernelgeo ConvergentRSGD; adam: kernelgeo RiemannianAdam "
                        "(give a smaller --lr, e.g. 1e-3; --momentum is unused); geoopt: "
                        "geoopt RiemannianSGD; sgd: torch SGD (Euclidean models only) "
                        "(default: %(default)s)")
    g.add_argument("--step-rule", choices=STEP_RULES, default=DEFAULT_STEP_RULE,
                   help="step-size rule of ConvergentRSGD: gsgd caps each step's length at "
                        "half the convexity-radius bound (plain Riemannian SGD below it); "
                        "bounded caps it at half the injectivity radius; none is plain "
                        "Riemannian SGD; see kernelgeo.optim.step_rules (default: %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning-rate schedule, stepped every iteration; cosine and step "
                        "depend on --epochs; plateau divides the rate by 10 each time the "
                        "training loss plateaus and stops at the last plateau, --epochs being "
                        "the most it may take (default: %(default)s)")
    g.add_argument("--rm-t0", type=_field("rm_t0", float), default=None,
                   help="Robbins-Monro t0 in steps (default: one epoch)")
    g.add_argument("--rm-power", type=_field("rm_power", float), default=0.75,
                   help="Robbins-Monro decay power in (0.5, 1] (default: %(default)s)")
    g.add_argument("--plateau-tol", type=_field("plateau_tol", float), default=0.02,
                   help="plateau schedule: the training loss has plateaued when its relative "
                        "change over --plateau-window epochs at one rate is below this "
                        "(default: %(default)s)")
    g.add_argument("--plateau-window", type=_field("plateau_window"), default=3,
                   help="plateau schedule: epochs over which the change is measured "
                        "(default: %(default)s)")
    g.add_argument("--plateau-decays", type=_field("plateau_decays"), default=2,
                   help="plateau schedule: rate divisions before the plateau that ends the "
                        "run (default: %(default)s)")
    g.add_argument("--epochs", type=_field("epochs"), default=d["epochs"],
                   help="with --resume it may grow (extending a finished run) for the "
                        "constant, robbins-monro and plateau schedules only; the most a plateau "
                        "run may take (default: %(default)s)")
    g.add_argument("--batch-size", type=_field("batch_size"), default=d["batch_size"],
                   help="global batch size (default: %(default)s)")
    g.add_argument("--lr", type=_field("lr", float), default=d["lr"],
                   help="initial learning rate, finite > 0 (default: %(default)s)")
    g.add_argument("--momentum", type=_field("momentum", float), default=0.9,
                   help="in [0, 1) (default: %(default)s)")
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=_field("weight_decay", float), default=5e-4,
                   help="weight decay of Euclidean parameters (default: %(default)s)")
    g.add_argument("--manifold-weight-decay", type=_field("manifold_weight_decay", float),
                   default=0.0, help="weight decay of manifold kernels (default: %(default)s)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N "
                                                    "(default: %(default)s)")
    g.add_argument("--amp", nargs="?", const="bf16", default="none", choices=AMP_MODES,
                   help="autocast: bf16 (also plain --amp), or fp16 with loss scaling "
                        "(GradScaler: gradients are unscaled before the manifold step, steps "
                        "with inf/NaN gradients are skipped) (default: %(default)s)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch deterministic algorithms (bitwise-reproducible resume on CPU "
                        "holds without it)")
    g.add_argument("--threads", type=_field("threads"), default=None,
                   help="torch CPU threads (default: 1 for 8x8 images, else all cores / ranks)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    g.add_argument("--print-freq", type=_field("print_freq"), default=None, metavar="N",
                   help="print a progress line every N batches (also when output is piped; "
                        "default: a progress bar on a terminal, nothing otherwise)")


_SEED = _field("seed")


def build_parser() -> argparse.ArgumentParser:
    """The ``kernelgeo`` argument parser (subcommands train, compare, demo, analyze)."""
    from . import __version__
    from .distributed import EPILOG
    from .manifolds import available

    epilog = f"{OUTPUT_HELP}\n\n{EPILOG}"
    parser = argparse.ArgumentParser(
        prog="kernelgeo", description="Training CNNs with convolution kernels on submanifolds "
        "(Ozay & Okatani 2016): sphere, centred sphere, oblique and Stiefel geometries.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"kernelgeo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    geo_help = (f"geometry: a name ({', '.join(available())}), a product like "
                "'po:sphere+stiefel' or 'po:2:sphere+stiefel', or per-layer rules "
                "'layer1.*=sphere,layer3.*=stiefel,*=euclidean' (module-name globs, first "
                "match wins; unmatched layers stay euclidean); '@r' after a manifold sets "
                "its radius, e.g. 'stiefel@1.4142' (default radius 1)")

    p = sub.add_parser("train", help="train one model",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
                       description="Train one model on one geometry; writes config.json, "
                       "geometry.md, metrics.jsonl, metrics.csv, checkpoint.pt and "
                       "summary.json to --out.")
    _add_common(p)
    p.add_argument("--geometry", type=_arg_geometry, default="euclidean", help=geo_help)
    p.add_argument("--seed", type=_SEED, default=0, help="in [0, 2**63) (default: %(default)s)")
    _add_output(p, "train", resume=True)
    p.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoints")
    p.add_argument("--no-path-length", action="store_true",
                   help="do not measure the path length the weights travel (it costs a copy "
                        "of the weights and a few operations per step)")
    p.add_argument("--stop-after", type=_field("stop_after"), default=None, metavar="E",
                   help="stop after E epochs of this invocation (resumable with --resume), "
                        "e.g. to fit a job time limit")
    p.add_argument("--max-steps", type=_field("max_steps"), default=None,
                   help="stop after this many optimizer steps in total (smoke tests)")
    p.add_argument("--sync-check-every", type=_field("sync_check_every"), default=100,
                   metavar="K",
                   help="DDP: check every K steps that all ranks hold identical parameters")
    p.add_argument("--broadcast-every", type=_field("broadcast_every"), default=0, metavar="K",
                   help="DDP: copy rank 0's parameters to all ranks every K steps (0: never)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="compare geometries x seeds, write report.md",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=OUTPUT_HELP,
                       description="Train the same model/data/schedule for several geometries "
                       "and seeds; write report.md, results.csv, runs.csv, loss.png, "
                       "error.png to --out (each run in <out>/<geometry>/seed<k>/).")
    _add_common(p)
    p.add_argument("--geometries", nargs="+", type=_arg_geometry,
                   default=["euclidean", "sphere", "oblique", "stiefel"], help=geo_help)
    p.add_argument("--seeds", nargs="+", type=_SEED, default=[0])
    _add_output(p, "compare", resume=True)
    p.add_argument("--title", default="Kernel geometry comparison")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="the `make demo` comparison on digits (about a minute)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=OUTPUT_HELP,
                       description="compare on digits for euclidean, sphere, oblique, stiefel "
                       "and po:sphere+stiefel, 1 seed; writes <out>/report.md.")
    _add_output(p, "demo", resume=False)
    p.add_argument("--epochs", type=_field("epochs"), default=20, help="(default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=_SEED, default=[0])
    p.add_argument("--optimizer", choices=("rsgd", "geoopt"), default="rsgd")
    p.set_defaults(func=_cmd_demo)

    _add_analyze(sub)
    return parser


def _add_analyze(sub) -> None:
    from .analysis.report import add_analyze_arguments

    p = sub.add_parser("analyze", help="how each run's geometry reshapes its search space",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=OUTPUT_HELP,
                       description="Analyse trained `kernelgeo train` runs: per layer the "
                       "invariance gap, curvature along the optimizer's gradient and momentum, "
                       "normal curvature, distance from the initialization, sharpness, 1-D "
                       "geodesic vs straight-line interpolation and 2-D slices; writes "
                       "report.md, figures and summary.json to --out.")
    add_analyze_arguments(p)
    p.set_defaults(func=_cmd_analyze)
    _add_output(p, "analyze", resume=False, with_out=False)


def _out_dir(args, command: str, *, resume: bool = False) -> Path:
    """``--out`` or ``runs/<command>/<--name or time>``, checked (see
    :func:`kernelgeo.training.rundir.check_out`)."""
    import os

    from .training import rundir

    if args.out is None:
        if args.name is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a start-time name could differ between the ranks of a torchrun job
            raise ConfigError("under torchrun give --out or --name, so that every rank "
                              "writes to the same directory")
        args.out = str(rundir.default_out(command, args.name))
    elif args.name is not None:
        raise ConfigError("give --out or --name, not both")
    return Path(args.out)


def _cmd_analyze(args, argv) -> int:
    from .analysis.report import main_analyze
    from .runs import RunError
    from .training import rundir

    out = _out_dir(args, "analyze")
    action = rundir.check_out(out, force=args.force, what="report", resumable=False)

    def prepare():
        moved = rundir.prepare_out(out, action)
        if moved is not None:
            print(f"moved the previous contents of {out} to {moved} (--force)")

    try:
        # the runs are loaded and checked before the output directory is touched
        return int(main_analyze(args, before_write=prepare) or 0)
    except RunError as err:
        raise ConfigError(str(err)) from None


_SKIP = {"func", "command", "geometries", "seeds", "title", "no_checkpoint", "name",
         "no_path_length"}


def _config(args, **over) -> TrainConfig:
    fields = set(TrainConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in fields and k not in _SKIP}
    if getattr(args, "no_checkpoint", False):
        kw["checkpoint"] = False
    if getattr(args, "no_path_length", False):
        kw["track_path"] = False
    kw.update(over)
    return TrainConfig(**kw)


def _command_line(argv) -> str:
    return shlex.join(["kernelgeo", *argv])


def _cmd_train(args, argv) -> int:
    from .training import train

    _out_dir(args, "train")
    summary = train(_config(args, command=_command_line(argv)))
    if not args.quiet and summary.get("final_test_error") is not None and (
            summary["world_size"] == 1 or _rank() == 0):
        print(f"final test error {100 * summary['final_test_error']:.2f}%  best "
              f"{100 * summary['best_test_error']:.2f}% (epoch {summary['best_epoch']})  "
              f"{summary['time_per_epoch']:.2f} s/epoch  max constraint error "
              f"{summary['max_constraint_error']:.1e}\nsummary: {Path(args.out) / 'summary.json'}")
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _cmd_compare(args, argv) -> int:
    from .compare import run_compare
    from .training import rundir

    out = _out_dir(args, "compare")
    if not args.resume and not args.force:
        rundir.check_out(out, what="comparison")
    res = run_compare(_config(args, quiet=True), args.geometries, args.seeds, out,
                      title=args.title, command=_command_line(argv),
                      log=(lambda *_: None) if args.quiet else print)
    print(f"\n{res['table']}\nreport: {res['report']}")
    return 0


def _cmd_demo(args, argv) -> int:
    from .compare import DEMO_GEOMETRIES, run_demo
    from .training import rundir

    out = _out_dir(args, "demo")
    if not args.force:
        rundir.check_out(out, what="demo", resumable=False)
    t = time.perf_counter()
    print(f"kernelgeo demo: {', '.join(DEMO_GEOMETRIES)} on UCI digits, {args.epochs} epochs, "
          f"seeds {args.seeds}")
    res = run_demo(out, epochs=args.epochs, seeds=args.seeds, optimizer=args.optimizer,
                   force=args.force, command=_command_line(argv))
    print(f"\n{res['table']}\nreport: {res['report']}  ({time.perf_counter() - t:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kernelgeo`` console script; returns the exit status."""
    from .checkpoint import CheckpointError
    from .data import DataNotFoundError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = getattr(args, "command", None)
    try:
        return args.func(args, argv)
    except ConfigError as err:
        # argparse convention: usage errors exit 2 with the message, no traceback
        parser.exit(2, f"kernelgeo {sub}: error: {err}\n")
    except (DataNotFoundError, CheckpointError, OSError, FloatingPointError) as err:
        parser.exit(1, f"kernelgeo {sub}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, "kernelgeo: interrupted" + ("; continue with --resume\n"
                                                     if sub in ("train", "compare") else "\n"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
