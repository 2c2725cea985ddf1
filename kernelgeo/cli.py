"""Command-line interface: ``kernelgeo {train,compare,demo,analyze}``, or ``python -m kernelgeo``.

Examples::

    kernelgeo demo                                   # 5 geometries on digits, ~1 min on a CPU
    kernelgeo train --dataset digits --geometry sphere --epochs 20 --out runs/sphere
    kernelgeo train --dataset cifar10-jpeg --model resnet20 \\
        --geometry 'layer1.*=sphere,layer3.*=stiefel,*=euclidean' --out runs/mixed
    kernelgeo train --out runs/mixed --resume ...    # continue an interrupted run exactly
    kernelgeo compare --dataset digits --geometries euclidean sphere stiefel --seeds 0 1 2
    torchrun --nproc_per_node 2 -m kernelgeo train ...   # data-parallel (see --help epilog)

Bad names and malformed options exit with status 2 and a message listing the valid choices;
missing data or an unreadable checkpoint exit with status 1 and say where and why.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "parse_rules"]


def _names() -> dict[str, list[str]]:
    from .data import available_datasets
    from .manifolds import available
    from .models import available_models

    return {"datasets": list(available_datasets()), "models": available_models(),
            "geometries": available()}


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


def _arg_geometry(s: str) -> str:
    from .train import ConfigError, check_geometry

    try:
        return check_geometry(s)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_rules(s: str) -> str | dict[str, str]:
    """Parse ``--geometry``: a name, or ``glob=name,...`` rules (see
    :func:`kernelgeo.train.parse_geometry`)."""
    from .train import parse_geometry

    return parse_geometry(s)


def _number(convert, ok, what: str):
    """argparse type: ``convert`` the string, then require ``ok(value)``."""
    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_pos_int = _number(int, lambda v: v >= 1, "a positive integer")
_pos_float = _number(float, lambda v: v > 0, "a positive number")
_nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")


def _add_common(p: argparse.ArgumentParser, *, defaults: dict | None = None) -> None:
    """Options shared by ``train`` and ``compare`` (everything but geometry/seed/out)."""
    from .train import OPTIMIZERS, SCHEDULES, STEP_RULES

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
    g.add_argument("--train-subset", type=_pos_int, default=None, metavar="N",
                   help="train on a stratified subset of N images")
    g.add_argument("--test-subset", type=_pos_int, default=None, metavar="N",
                   help="evaluate on a stratified subset of N test images")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the fixed train/test split (digits) and of subsets")
    g.add_argument("--image-size", type=_pos_int, default=None,
                   help="resize folder:<path> images to this size")
    g.add_argument("--augment", default="auto",
                   choices=("auto", "none", "crop", "flip", "crop+flip"),
                   help="auto: crop+flip for >=16px colour images, crop only for characters, "
                        "none for 8x8 digits")
    g.add_argument("--crop-padding", type=int, default=None,
                   help="zero padding of the random crop (default: image size / 8)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", type=_arg_model, default=None,
                   help="resnet20/32/44/56/110 (option-A shortcuts; -b for option B), "
                        "wrn-D-K, resnet-digits, torchvision:<name> "
                        "(default: resnet-digits for 8x8 images, else resnet20)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="rsgd",
                   help="rsgd: kernelgeo ConvergentRSGD; geoopt: geoopt RiemannianSGD; "
                        "sgd: torch SGD (Euclidean models only) (default: %(default)s)")
    g.add_argument("--step-rule", choices=STEP_RULES, default="gsgd",
                   help="step-size rule of ConvergentRSGD: gsgd clips each step's length at "
                        "half the convexity radius (plain Riemannian SGD below it); bounded "
                        "clips at half the injectivity radius; none is plain Riemannian SGD "
                        "(default: %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning-rate schedule, stepped every iteration (default: %(default)s)")
    g.add_argument("--rm-t0", type=_pos_float, default=None,
                   help="Robbins-Monro t0 in steps (default: one epoch)")
    g.add_argument("--rm-power", type=float, default=0.75,
                   help="Robbins-Monro decay power in (0.5, 1] (default: %(default)s)")
    g.add_argument("--epochs", type=_pos_int, default=d["epochs"],
                   help="(default: %(default)s)")
    g.add_argument("--batch-size", type=_pos_int, default=d["batch_size"],
                   help="global batch size (default: %(default)s)")
    g.add_argument("--lr", type=_pos_float, default=d["lr"], help="(default: %(default)s)")
    g.add_argument("--momentum", type=_nonneg_float, default=0.9,
                   help="(default: %(default)s)")
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=_nonneg_float, default=5e-4,
                   help="weight decay of Euclidean parameters (default: %(default)s)")
    g.add_argument("--manifold-weight-decay", type=_nonneg_float, default=0.0,
                   help="weight decay of manifold kernels (default: %(default)s)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N "
                                                    "(default: %(default)s)")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    g.add_argument("--deterministic", action="store_true",
                   help="torch deterministic algorithms (bitwise-reproducible resume on CPU "
                        "holds without it)")
    g.add_argument("--threads", type=_pos_int, default=None,
                   help="torch CPU threads (default: 1 for 8x8 images, else all cores / ranks)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt (exactly, incl. RNG states)")


def build_parser() -> argparse.ArgumentParser:
    """The ``kernelgeo`` argument parser (subcommands train, compare, demo, analyze)."""
    from . import __version__
    from .distributed import EPILOG

    parser = argparse.ArgumentParser(
        prog="kernelgeo", description="Training CNNs with convolution kernels on submanifolds "
        "(Ozay & Okatani 2016): sphere, centred sphere, oblique and Stiefel geometries.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"kernelgeo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from .manifolds import available

    geo_help = (f"geometry: a name ({', '.join(available())}), a product like "
                "'po:sphere+stiefel', or per-layer rules 'layer1.*=sphere,layer3.*=stiefel,"
                "*=euclidean' (module-name globs, first match wins; unmatched layers stay "
                "euclidean)")

    p = sub.add_parser("train", help="train one model",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Train one model on one geometry; writes metrics.jsonl, "
                       "metrics.csv, checkpoint.pt and summary.json to --out.")
    _add_common(p)
    p.add_argument("--geometry", type=_arg_geometry, default="euclidean", help=geo_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: runs/<time>)")
    p.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoints")
    p.add_argument("--stop-after", type=_pos_int, default=None, metavar="E",
                   help="stop after E epochs of this invocation (resumable with --resume), "
                        "e.g. to fit a job time limit")
    p.add_argument("--max-steps", type=_pos_int, default=None,
                   help="stop after this many optimizer steps in total (smoke tests)")
    p.add_argument("--sync-check-every", type=int, default=100, metavar="K",
                   help="DDP: check every K steps that all ranks hold identical parameters")
    p.add_argument("--broadcast-every", type=int, default=0, metavar="K",
                   help="DDP: copy rank 0's parameters to all ranks every K steps (0: never)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="compare geometries x seeds, write report.md",
                       description="Train the same model/data/schedule for several geometries "
                       "and seeds; write report.md, results.csv, runs.csv, loss.png, "
                       "error.png to --out.")
    _add_common(p)
    p.add_argument("--geometries", nargs="+", type=_arg_geometry,
                   default=["euclidean", "sphere", "oblique", "stiefel"], help=geo_help)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default="runs/compare", help="(default: %(default)s)")
    p.add_argument("--title", default="Kernel geometry comparison")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="the `make demo` comparison on digits (about a minute)",
                       description="compare on digits for euclidean, sphere, oblique, stiefel "
                       "and po:sphere+stiefel, 1 seed; writes <out>/report.md.")
    p.add_argument("--out", default="runs/demo", help="(default: %(default)s)")
    p.add_argument("--epochs", type=_pos_int, default=20, help="(default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--optimizer", choices=("rsgd", "geoopt"), default="rsgd")
    p.set_defaults(func=_cmd_demo)

    _add_analyze(sub)
    return parser


def _add_analyze(sub) -> None:
    try:
        from .analysis.report import add_analyze_arguments  # noqa: F401
    except ImportError:
        return  # the analysis package does not provide the subcommand (yet)
    p = sub.add_parser("analyze", help="geometric analysis of kernels and runs")
    add_analyze_arguments(p)
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from .analysis.report import main_analyze

    return int(main_analyze(args) or 0)


_SKIP = {"func", "command", "geometries", "seeds", "title", "no_checkpoint"}


def _config(args, **over):
    from .train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in fields and k not in _SKIP}
    if getattr(args, "no_checkpoint", False):
        kw["checkpoint"] = False
    kw.update(over)
    return TrainConfig(**kw)


def _command_line(argv) -> str:
    return shlex.join(["kernelgeo", *argv])


def _cmd_train(args, argv) -> int:
    from .train import train

    if args.out is None:
        args.out = str(Path("runs") / time.strftime("train-%Y%m%d-%H%M%S"))
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

    res = run_compare(_config(args, quiet=True), args.geometries, args.seeds, args.out,
                      title=args.title, command=_command_line(argv),
                      log=(lambda *_: None) if args.quiet else print)
    print(f"\n{res['table']}\nreport: {res['report']}")
    return 0


def _cmd_demo(args, argv) -> int:
    from .compare import DEMO_GEOMETRIES, run_demo

    t = time.perf_counter()
    print(f"kernelgeo demo: {', '.join(DEMO_GEOMETRIES)} on UCI digits, {args.epochs} epochs, "
          f"seeds {args.seeds}")
    res = run_demo(args.out, epochs=args.epochs, seeds=args.seeds, optimizer=args.optimizer,
                   command=_command_line(argv))
    print(f"\n{res['table']}\nreport: {res['report']}  ({time.perf_counter() - t:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kernelgeo`` console script; returns the exit status."""
    from .checkpoint import CheckpointError
    from .data import DataNotFoundError
    from .train import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, argv) if args.func is not _cmd_analyze else args.func(args)
    except ConfigError as err:
        sub = getattr(args, "command", None)
        # argparse convention: usage errors exit 2 with the message, no traceback
        parser.exit(2, f"kernelgeo {sub}: error: {err}\n")
    except (DataNotFoundError, CheckpointError) as err:
        parser.exit(1, f"kernelgeo: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, "kernelgeo: interrupted; continue with --resume\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
