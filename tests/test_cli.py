"""The fastvis command line: `python -m fastvis` / the `fastvis` console script.

The command-line tests run the CLI in a subprocess (`sys.executable -m fastvis`), using the
fastvis this test process imports (installed, or the dev build via PYTHONPATH=python). The
benchmark test runs a tiny `fastvis bench dwconv --quick` case; timings are not checked,
only that the run completes, checks fastvis against PyTorch and prints its tables.
"""

import json
import os
import shutil
import subprocess
import sys

import time

import pytest

import fastvis
from fastvis import cli
from fastvis.bench import dwconv, print_table, timing

# The directory holding the fastvis package this process imported, first on the child's path.
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastvis.__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PKG_PARENT, env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastvis", *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


def _error_lines(stderr):
    """stderr without Python warnings a dependency may print on import."""
    return [l for l in stderr.strip().splitlines() if l.strip() and "Warning" not in l]


# ------------------------------------------------------------------------- subprocess


def test_help():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert "usage: fastvis" in r.stdout
    for command in ("bench", "info"):
        assert command in r.stdout


def test_info():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("fastvis ")
    assert "build:" in r.stdout and "runtime:" in r.stdout
    # every key of build_info() is shown
    for key in fastvis.build_info():
        assert str(key) in r.stdout


def test_unknown_subcommand_is_one_line_and_exit_2():
    r = run_cli("no-such-command")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastvis: error:")
    assert "no-such-command" in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("grn", [True, False])
def test_bench_mlp_quick(grn):
    r = run_cli("bench", "mlp", "--quick", "--no-compile", "--format", "text",
                *([] if grn else ["--no-grn"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "training step" in r.stdout and "inference" in r.stdout
    assert ("GELU, GRN, fc2" in r.stdout) == grn
    for col in ("fastvis ms", "eager ms", "eager/fastvis", "saved MB fastvis", "saved ratio", "rel err"):
        assert col in r.stdout
    rows = [l.split() for l in r.stdout.splitlines() if l.startswith("16 ")]
    assert len(rows) == 2 and float(rows[0][-1]) < 1e-5  # fastvis matches the reference
    assert float(rows[0][-2]) < 0.7  # keeps less than eager PyTorch
    assert "C=16 8x8 N=1 training: timing fastvis, eager" in r.stderr
    assert "fastvis path per shape" in r.stdout and "fused blocks' GEMM:" in r.stdout
    import importlib
    import torch
    mod = importlib.import_module("fastvis.ops.mlp")
    path = mod.mlp_path(torch.zeros(1, 8, 8, 16), torch.zeros(64, 16), torch.zeros(16, 64),
                        None if not grn else torch.zeros(64))
    assert rows[0][3] == path  # the path column names what the op ran


def test_bench_model_flop_count_matches_the_formula():
    """The FLOPs `fastvis bench model` sets against the sgemm rate: 2 per multiply-add of
    every convolution (grouped ones by their groups) and matrix product, nothing else."""
    import torch.nn as nn

    from fastvis.bench import model as bench_model

    s = 12
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                      nn.Conv2d(8, 16, 2, stride=2), nn.Flatten(), nn.Linear(16 * (s // 2) ** 2, 10))
    macs = s * s * 8 * 3 * 9 + s * s * 8 * 25 + (s // 2) ** 2 * 16 * 8 * 4 + 16 * (s // 2) ** 2 * 10
    assert bench_model._model_gflop(m, s) == pytest.approx(2 * macs * 1e-9, rel=1e-12)


def test_bench_gemm_line_names_the_gemm_and_the_openblas_kernels():
    """`bench model` / `bench block` headers say which GEMM and OpenBLAS kernels ran, and
    whether the core's own kernels serve the products."""
    line = timing.gemm_line()
    assert f"fused blocks' GEMM: {fastvis._C.sgemm_provider()}," in line
    own = "on" if fastvis._C.own_gemm_active() else "off"
    assert f"own AVX-512 kernels {own};" in line
    assert fastvis.build_info()["openblas"] in line and "OpenBLAS" in line
    assert ("own AVX-512" in timing.core_sgemm_name()) == fastvis._C.own_gemm_active()


def test_bench_model_bound_rows():
    """The bound tables' arithmetic on made-up timings: inference sets every counted FLOP at
    the sgemm rate against fastvis and twice the baseline; the training step counts 3x the
    forward's FLOPs and gives the bound as a multiple of the baseline's rate."""
    from fastvis.bench import model as bench_model

    r = bench_model.Result("m", 8, 224, gflop_per_image=10.0)
    r.median_s = {"fastvis": 1.0, "timm eager": 2.0}  # 8 and 4 img/s
    r.train_median_s = {"fastvis": 4.0, "timm eager": 5.0}  # 2 and 1.6 img/s
    (inf,) = bench_model._bound_rows([r], sgemm=100.0, train=False)
    # bound 100 / 10 = 10 img/s: fastvis at 80 %, twice the baseline at 80 %
    assert inf == ["m", "8", "10.00", "10.0", "8.00", "80%", "timm eager", "4.00", "80%"]
    (tr,) = bench_model._bound_rows([r], sgemm=100.0, train=True)
    # 30 GFLOP/img: bound 3.33 img/s; fastvis 2 (60 %), baseline 1.6 (48 %), bound / baseline 2.08x
    assert tr == ["m", "8", "30.00", "3.3", "2.00", "60%", "timm eager", "1.60", "48%", "2.08x"]
    r.baseline, r.train_median_s = "reference", {"fastvis": 4.0}  # no baseline time: dashes
    (tr,) = bench_model._bound_rows([r], sgemm=100.0, train=True)
    assert tr[6:] == ["reference", "-", "-", "-"]
    assert bench_model._bound_rows([bench_model.Result("m", 1, 224)], 100.0, train=True) == []


def test_bench_dwconv_quick(tmp_path):
    out = tmp_path / "dwconv.json"
    r = run_cli("bench", "dwconv", "--quick", "--no-compile", "--kernels", "3", "--batch", "1",
                "--channels", "8", "--size", "8", "--format", "text", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    # a table per pass, with the case and the comparison columns
    assert "Forward" in r.stdout and "Forward + backward" in r.stdout
    for col in ("fastvis ms", "eager NCHW", "eager CL", "vs eager", "GFLOP/s"):
        assert col in r.stdout
    assert "3x3" in r.stdout and "8x8" in r.stdout
    assert "match PyTorch" in r.stdout
    # progress goes to stderr, not into the table
    assert "N=1 C=8 8x8 k=3x3" in r.stderr
    assert "timing" not in r.stdout

    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "dwconv" and doc["complete"] is True
    assert doc["settings"]["compile_layouts"] == []
    assert [res["pass"] for res in doc["results"]] == ["fwd", "fwd+bwd"]
    for res in doc["results"]:
        assert (res["kh"], res["kw"], res["n"], res["c"], res["h"], res["w"]) == (3, 3, 1, 8, 8, 8)
        assert set(res["times"]) == {"fastvis", "eager_nchw", "eager_cl"}
        for t in res["times"].values():
            assert t["median"] > 0 and t["min"] <= t["median"] and t["repeats"] >= 1
        assert res["check"]["ok"] is True
        assert res["speedup_vs_eager"] > 0
        assert res["flops"] == 2 * 1 * 8 * 8 * 8 * 9 * (3 if res["pass"] == "fwd+bwd" else 1)


@pytest.mark.skipif(shutil.which("fastvis") is None, reason="console script not installed")
def test_console_script():
    r = subprocess.run(["fastvis", "--help"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: fastvis" in r.stdout


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("argv, fragment", [
    ([], "required"),
    (["bench"], "required"),
    (["bench", "nope"], "invalid choice"),
    (["bench", "dwconv", "--kernels", "3,x"], "invalid kernel size 'x'"),
    (["bench", "dwconv", "--kernels", "0"], "invalid kernel size '0'"),
    (["bench", "dwconv", "--repeat", "0"], "--repeat"),
    (["bench", "dwconv", "--dtype", "float16"], "invalid choice"),
    (["bench", "dwconv", "--size", "8x"], "invalid size"),
    (["bench", "dwconv", "--bogus"], "unrecognized arguments: --bogus"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastvis") and "error:" in lines[0]
    assert fragment in lines[0]


def test_bench_dwconv_core_column(tmp_path):
    """--core adds the kernel alone (forward only), checked equal to the op's output."""
    out = tmp_path / "core.json"
    r = run_cli("bench", "dwconv", "--quick", "--no-compile", "--core", "--kernels", "5x3", "--batch",
                "2", "--channels", "12", "--size", "9x7", "--format", "text", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "core ms" in r.stdout and "failed" not in r.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["core"] is True
    fwd, fb = doc["results"]
    assert set(fwd["times"]) == {"fastvis", "fastvis_core", "eager_nchw", "eager_cl"}
    assert fwd["times"]["fastvis_core"]["median"] > 0
    assert "fastvis_core" not in fb["times"]  # forward only
    r = run_cli("bench", "dwconv", "--op", "inception", "--core", "--quick")
    assert r.returncode != 0 and "--core applies to the plain depthwise convolution" in r.stderr


def test_bench_help_lists_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "dwconv", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--kernels", "--batch", "--channels", "--size", "--dtype", "--warmup",
                "--repeat", "--threads", "--quick", "--json", "--no-compile"):
        assert opt in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"version", "build", "runtime"}
    assert doc["runtime"]["torch_threads"] >= 1


def test_parse_kernels_and_sizes():
    assert dwconv.parse_kernels("3,5, 1x11 11X1") == [(3, 3), (5, 5), (1, 11), (11, 1)]
    assert dwconv.parse_kernels(["3", "7"]) == [(3, 3), (7, 7)]
    assert dwconv.parse_sizes("56,28x32") == [(56, 56), (28, 32)]
    assert dwconv.parse_positive_ints("8,1", "batch size") == [8, 1]


def test_default_cases():
    args = cli.build_parser().parse_args(["bench", "dwconv"])
    s = dwconv.Settings.from_args(args)
    assert [f"{kh}x{kw}" for kh, kw in s.kernels] == \
        ["3x3", "5x5", "7x7", "13x13", "31x31", "51x51", "1x11", "11x1"]
    assert s.batch == [8, 1] and s.channels == [128] and s.sizes == [(56, 56)]
    assert s.dtype == "float32" and s.compile_layouts == ("nchw", "channels_last")
    assert len(s.cases()) == 16
    quick = dwconv.Settings.from_args(
        cli.build_parser().parse_args(["bench", "dwconv", "--quick", "--repeat", "5"]))
    assert quick.repeat == 5 and len(quick.cases()) < len(s.cases())


def test_interleaved_timing():
    calls = {"a": 0, "b": 0}

    def fa():
        calls["a"] += 1

    def fb():
        calls["b"] += 1

    st = timing.measure_interleaved({"a": fa, "b": fb}, warmup=2, repeat=4,
                                    min_block_time=1e-4, settle=0)
    for name in ("a", "b"):
        assert st[name].repeats == 4 and st[name].warmup == 2
        assert 0 < st[name].min <= st[name].median
        assert calls[name] >= 2 + 4 * st[name].number
    # settling: untimed calls for ~settle seconds before each block of a fast candidate,
    # and exactly one before each block of a candidate slower than that
    before = dict(calls)
    st = timing.measure_interleaved({"a": fa}, warmup=0, repeat=3, min_block_time=1e-4,
                                    settle=0.01)
    extra = calls["a"] - before["a"] - 3 * st["a"].number
    assert extra > 3 * st["a"].number, (extra, st["a"].number)
    slow_calls = []
    timing.measure_interleaved({"s": lambda: (slow_calls.append(1), time.sleep(0.004))},
                               warmup=0, repeat=2, min_block_time=1e-3, settle=0.002)
    # calibration (one 4 ms call already fills a 1 ms block) + 2 one-call blocks, each
    # after one untimed settling call
    assert len(slow_calls) == 5, len(slow_calls)
    # a time budget cuts the samples of a slow candidate down, but not below min_repeat
    slow = timing.measure(lambda: sum(range(20000)), warmup=0, repeat=50,
                          min_block_time=1e-4, max_time=1e-6, min_repeat=3)
    assert slow.repeats == 3


@pytest.mark.parametrize("fmt", ["text", "markdown"])
def test_print_table(fmt, capsys):
    print_table("Title", ["name", "ms"], [["a", "1.00"], ["bbb", "10.0"]], fmt=fmt, n_left=1)
    out = capsys.readouterr().out
    assert "Title" in out and "bbb" in out and "10.0" in out
    if fmt == "markdown":
        assert "| name | ms |" in out and "|:---|---:|" in out


# fastvis bench pins glibc malloc's thresholds (fastvis.bench.pin_malloc). Two 12.8 MB
# tensors allocated and freed per step: with glibc's adaptive thresholds the freed top of
# the heap passes the trim threshold and goes back to the system, so every step faults both
# in again (~6,200 minor faults a step with glibc 2.36 here, 3,125 pages a tensor); pinned,
# the memory is reused. Either way the heap first grows for several steps: faults per step
# measured (session 26) 6287, 6250, 6250, 3125, 6250, 6250, then 0 -- five to eight steps
# before it settles, more in the clean-clone CI's venv than in the dev checkout, so after
# 3 warm-up steps the CI measured 312-1562 faults a step with the thresholds pinned
# (without fastvis imported as well), and 1562.5 failed the bound below once. The steps
# are therefore counted after 20 warm-up steps (then 0 in 10 of 10 CI-venv runs). With
# glibc's adaptive thresholds a steady state faults both tensors every step in some
# processes (6,218) and none in others; the bound, half of one tensor's pages a step,
# tells reuse from that.
_PIN_CHECK = """
import resource, sys, torch
import fastvis.bench as b
print(b.pin_malloc())
def step():
    a = torch.empty(3_200_000); c = torch.empty(3_200_000)
    a.fill_(1.0); c.fill_(2.0)
    del a, c
for _ in range(20): step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10): step()
print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_pin_malloc_reuses_freed_tensors():
    r = subprocess.run([sys.executable, "-c", _PIN_CHECK], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("allocator: glibc malloc with fixed thresholds"), lines
    faults = float(lines[-1].split()[1])
    assert faults < 3125 / 2, lines


def test_bench_malloc_option():
    """The allocator line comes first on stdout; --malloc system leaves glibc alone."""
    common = ("bench", "dwconv", "--quick", "--no-compile", "--no-backward", "--kernels", "3",
              "--batch", "1", "--channels", "8", "--size", "8", "--format", "text")
    r = run_cli(*common)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("allocator: ")
    r = run_cli(*common, "--malloc", "system")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "allocator: as the system set it up (--malloc system)"
    r = run_cli(*common, "--malloc", "jemalloc")
    assert r.returncode != 0 and "invalid choice" in r.stderr
