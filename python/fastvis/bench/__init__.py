"""Benchmarks of fastvis against PyTorch, measured in the same run.

Each benchmark is a module that defines

    HELP: str                                   one line, shown by ``fastvis bench --help``
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        the exit code

and is registered below by name; ``fastvis bench <name>`` then runs it. Modules are
imported only when the command line is built, and they keep their heavy imports (the
fastvis ops, torch.compile) inside ``run`` so that ``--help`` stays cheap and works even
when an op is missing.

To add a benchmark (e.g. ``fastvis bench model``): write ``fastvis/bench/model.py`` with
the three names above and add one line to ``BENCHMARKS``.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from types import ModuleType
from typing import Dict, List, Optional, Sequence, TextIO

# name -> module (relative to this package)
BENCHMARKS: Dict[str, str] = {
    "dwconv": ".dwconv",
    "block": ".block",
    "mlp": ".mlp",
    "model": ".model",
    "train": ".train",
}

__all__ = ["BENCHMARKS", "names", "load", "pin_malloc", "print_table", "table_format_choices"]


def names() -> list:
    return list(BENCHMARKS)


def load(name: str) -> ModuleType:
    """The benchmark module registered as ``name``."""
    try:
        module = BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r} (available: {', '.join(BENCHMARKS)})") from None
    return importlib.import_module(module, __name__)


# ------------------------------------------------------------------- the allocator

# glibc's malloc serves large blocks (a 12.8 MB activation) with mmap, or from the heap once
# freeing such a block has raised its adaptive mmap threshold, and gives freed memory at the
# top of the heap back to the system past its (also adaptive) trim threshold. Which of these
# a process ends up in depends on the order of its earlier allocations: measured on a
# depthwise 11x1 forward + backward (N=8, C=128, 56x56), fresh processes ran either at ~0.3
# or at ~6,200 minor page faults a step, the forward at 1.26 or 5.2 ms. Fixed thresholds
# take that run-to-run lottery out of a benchmark: freed blocks up to 32 MiB (glibc's
# largest mmap threshold) are kept and reused. Both candidates of a run share it.
MALLOC_TRIM_THRESHOLD = 1 << 30
MALLOC_MMAP_THRESHOLD = 32 << 20


def pin_malloc() -> str:
    """Fixes glibc's malloc trim and mmap thresholds for this process (see above) and says
    what was done, in one line. Does nothing, and says so, on other C libraries."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return "allocator: not glibc, left as it is"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has mallopt
        return "allocator: glibc without mallopt, left as it is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    if not (mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)):
        return "allocator: glibc refused the fixed thresholds, left as it is"
    return (f"allocator: glibc malloc with fixed thresholds (trim {MALLOC_TRIM_THRESHOLD >> 20} MiB, "
            f"mmap {MALLOC_MMAP_THRESHOLD >> 20} MiB: freed blocks up to that size are reused, "
            "not faulted in again; --malloc system keeps glibc's adaptive ones)")


# ------------------------------------------------------------------- tables (shared helper)


def table_format_choices() -> List[str]:
    return ["auto", "rich", "text", "markdown"]


def _have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                fmt: str = "auto", n_left: int = 0, out: Optional[TextIO] = None) -> None:
    """Prints a table of strings.

    fmt: "rich" (needs the rich package), "text" (aligned columns), "markdown" (GitHub
    pipe table, for pasting into docs) or "auto" (rich if importable, else text).
    n_left: how many leading columns are labels (left-aligned); the others are numbers
    (right-aligned).
    """
    out = sys.stdout if out is None else out
    if fmt == "auto":
        fmt = "rich" if _have_rich() else "text"
    if fmt == "rich":
        _print_rich(title, header, rows, n_left, out)
    elif fmt == "markdown":
        _print_markdown(title, header, rows, n_left, out)
    elif fmt == "text":
        _print_text(title, header, rows, n_left, out)
    else:
        raise ValueError(f"unknown table format {fmt!r}")


def _print_text(title, header, rows, n_left, out) -> None:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells):
        parts = [c.ljust(w) if i < n_left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    print(title, file=out)
    print(line(header), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print(line(row), file=out)


def _print_markdown(title, header, rows, n_left, out) -> None:
    def esc(c):
        return c.replace("|", "\\|")

    print(f"**{title}**", file=out)
    print(file=out)
    print("| " + " | ".join(esc(h) for h in header) + " |", file=out)
    print("|" + "|".join(":---" if i < n_left else "---:" for i in range(len(header))) + "|",
          file=out)
    for row in rows:
        print("| " + " | ".join(esc(c) for c in row) + " |", file=out)


def _print_rich(title, header, rows, n_left, out) -> None:
    from rich.console import Console
    from rich.table import Table

    # Not a terminal (a pipe, a file): do not squeeze the table into 80 columns.
    is_tty = hasattr(out, "isatty") and out.isatty()
    width = None if is_tty else max(shutil.get_terminal_size((200, 24)).columns, 200)
    console = Console(file=out, width=width)
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < n_left else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
