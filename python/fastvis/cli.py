"""The ``fastvis`` command line (also ``python -m fastvis``).

    fastvis info                 what this build contains (fastvis.build_info()) and the runtime
    fastvis bench <benchmark>    benchmarks against PyTorch, e.g. ``fastvis bench dwconv``
    fastvis train                train a model (fastvis.train.Trainer), default: the built-in digits
    fastvis validate             top-1 / top-5 / loss of a checkpoint

Commands are entries of ``COMMANDS``: a help line, a function that adds the command's
arguments to its sub-parser and a function that runs it and returns the exit code. A new
command is one more entry. Benchmarks are
registered in :mod:`fastvis.bench` and become ``fastvis bench <name>`` automatically.

Errors in the command line print one line on stderr and exit with code 2; errors while
running a command that are the user's or the environment's (raised as :class:`CommandError`)
print one line and exit with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable, Dict, NamedTuple, Optional, Sequence

__all__ = ["main", "build_parser", "CommandError", "COMMANDS"]

PROG = "fastvis"


class CommandError(Exception):
    """A failure to report to the user in one line (exit code 1), without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(str(message).split())  # keep it on one line
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------- fastvis info


def _version() -> str:
    import fastvis

    v = getattr(fastvis, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import version

        return version("fastvis")
    except Exception:
        return "unknown"


def _info_add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the information as JSON")


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v) if v else "-"
    if v is None or v == "":
        return "-"
    return str(v)


def _print_mapping(d: dict, indent: int, out) -> None:
    width = max((len(str(k)) for k in d), default=0)
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{' ' * indent}{k}:", file=out)
            _print_mapping(v, indent + 2, out)
        else:
            print(f"{' ' * indent}{str(k):<{width}}  {_fmt_value(v)}", file=out)


def runtime_info() -> dict:
    """Versions and thread counts of the running process (also recorded by the benchmarks)."""
    import torch

    import fastvis

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    get_threads = getattr(fastvis, "get_num_threads", None)
    if callable(get_threads):
        info["fastvis_threads"] = get_threads()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_info() -> dict:
    import fastvis

    fn = getattr(fastvis, "build_info", None)
    if not callable(fn):
        raise CommandError("fastvis.build_info() is not available in this build")
    try:
        info = fn()
    except Exception as e:  # the native module failed to answer
        raise CommandError(f"fastvis.build_info() failed: {e}") from e
    if not isinstance(info, dict):
        raise CommandError(f"fastvis.build_info() returned {type(info).__name__}, not a dict")
    return info


def _info_run(args: argparse.Namespace) -> int:
    info = build_info()
    rt = runtime_info()
    if args.json:
        print(json.dumps(_jsonable({"version": _version(), "build": info, "runtime": rt}),
                         indent=2))
        return 0
    out = sys.stdout
    print(f"fastvis {_version()}", file=out)
    print("build:", file=out)
    _print_mapping(info, 2, out)
    print("runtime:", file=out)
    _print_mapping(rt, 2, out)
    return 0


# ---------------------------------------------------------------------------- fastvis bench


def _bench_add_arguments(p: argparse.ArgumentParser) -> None:
    from . import bench

    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=_Parser)
    sub.required = True
    for name in bench.names():
        module = bench.load(name)
        help_line = getattr(module, "HELP", "")
        bp = sub.add_parser(name, help=help_line, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(bp)
        bp.add_argument("--malloc", choices=("pinned", "system"), default="pinned",
                        help="pinned (default): fix glibc malloc's trim and mmap thresholds "
                             "for the run, so that freed tensors are reused instead of being "
                             "page-faulted in again, which otherwise happens or not from "
                             "process to process (fastvis.bench.pin_malloc); system: leave "
                             "glibc's adaptive thresholds")
        bp.set_defaults(_run_benchmark=module.run, _parser=bp)


def _bench_run(args: argparse.Namespace) -> int:
    from . import bench

    if getattr(args, "malloc", "pinned") == "pinned":
        print(bench.pin_malloc(), flush=True)
    else:
        print("allocator: as the system set it up (--malloc system)", flush=True)
    return args._run_benchmark(args)


# ------------------------------------------------------------------ fastvis train / validate
# (the options and the runs live in fastvis.train.commands, imported when used)


def _train_add_arguments(p: argparse.ArgumentParser) -> None:
    from .train.commands import train_add_arguments

    train_add_arguments(p)


def _train_run(args: argparse.Namespace) -> int:
    from .train.commands import train_run

    return train_run(args)


def _validate_add_arguments(p: argparse.ArgumentParser) -> None:
    from .train.commands import validate_add_arguments

    validate_add_arguments(p)


def _validate_run(args: argparse.Namespace) -> int:
    from .train.commands import validate_run

    return validate_run(args)


# ------------------------------------------------------------------------------ the parser

COMMANDS: Dict[str, Command] = {
    "info": Command("show what this build of fastvis contains", _info_add_arguments, _info_run),
    "bench": Command("benchmark fastvis against PyTorch (same run, ratios)",
                     _bench_add_arguments, _bench_run),
    "train": Command("train a model (default: a small ConvNeXt on the built-in digits)",
                     _train_add_arguments, _train_run),
    "validate": Command("evaluate a checkpoint: top-1, top-5 and loss", _validate_add_arguments, _validate_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="fastvis: fast kernels for modern vision backbones.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in COMMANDS.items():
        cp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(cp)
        cp.set_defaults(_run_command=cmd.run, _parser=cp)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(None if argv is None else list(argv))
    if extra:  # blame the innermost (sub)command, whose --help lists what it accepts
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run_command(args) or 0)
    except CommandError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fastvis info | head -1`
        try:  # silence the flush at interpreter exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
