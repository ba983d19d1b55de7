"""``fastvis train`` / ``fastvis validate`` end to end, in subprocesses, on tiny models.

* a few-step run leaves the documented outputs (config, metrics, plot, checkpoints,
  summary) and ``fastvis validate`` reproduces the run's own validation numbers;
* image folders (made here with Pillow) train and validate;
* kill -9 of a real training process, then ``--resume``: the metrics of the resumed run are
  exactly those of an uninterrupted run with the same settings, none missing, none twice;
* bad input gives one clear line and exit code 1, never a traceback.

The tiny model is ``convnext_atto`` with dims (8, 16, 24, 32) and one block per stage, on
one thread (tiny ops on two threads of a busy 2-core machine mostly wait for each other).
Most commands run in this process through ``fastvis.cli.main`` (the console script's entry
point: the same parsing, error handling and exit codes) to save the seconds each new Python
process spends importing torch; the kill test runs a real ``python -m fastvis`` process.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastvis

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastvis.__file__)))
TINY = ["--model-arg", "dims=(8,16,24,32)", "--model-arg", "depths=(1,1,1,1)", "--threads", "1"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args):
    """``fastvis ARGS`` in this process; (exit code, stdout, stderr) like subprocess.run."""
    import contextlib
    import io

    from fastvis import cli

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse usage errors
                code = e.code
    finally:
        torch.set_num_threads(threads)
    return Result(code, out.getvalue(), err.getvalue())


def run_cli_subprocess(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastvis", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def popen_cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "fastvis", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd)


def records(out_dir, kind=None):
    recs = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if kind is None or r["kind"] == kind:
                recs.append(r)
    return recs


def assert_one_line_error(r, *needles):
    """Exit code 1, no traceback, and the error is one line: the last on stderr (a run that
    fails mid-way may have printed its progress before)."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
    errors = [l for l in lines if l.startswith("fastvis: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    r = run_cli("train", *TINY, "--epochs", "2", "--max-steps", "30", "--batch-size", "32", "--log-every", "5",
                "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--drop-path", "0.1", "--ema", "0.9",
                "--clip-grad", "1.0", "--layer-decay", "0.8", "--accum-steps", "2", "-q", "-o", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_train_outputs(tiny_run):
    out, r = tiny_run
    assert "done: 30 steps" in r.stdout and "validation top-1" in r.stdout
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model"] == "convnext_atto" and cfg["img_size"] == 32 and cfg["num_classes"] == 10
    assert cfg["hflip"] == 0.0 and cfg["mixup"] == 0.8 and cfg["accum_steps"] == 2
    tr, va = records(out, "train"), records(out, "val")
    # 1433 // 32 = 44 steps per epoch; max 30 steps: records every 5 steps
    assert [x["step"] for x in tr] == [5, 10, 15, 20, 25, 30]
    for x in tr:
        assert x["loss"] > 0 and x["lr"] > 0 and x["img_s"] > 0 and x["epoch"] == 0
    assert len(va) == 1 and va[0]["step"] == 30 and va[0]["val_images"] == 364
    for k in ("val_top1", "val_top5", "val_loss", "ema_val_top1"):
        assert k in va[0]
    assert 0 <= va[0]["val_top1"] <= va[0]["val_top5"] <= 100
    ck = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ck == ["best.pt", "ckpt-00000030.pt"]
    assert os.path.getsize(os.path.join(out, "plot.png")) > 1000
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 30 and summary["val_top1"] == va[0]["val_top1"]
    # "quiet" log lines, one per record
    assert r.stderr.count(" step ") >= 6


def test_checkpoint_contents(tiny_run):
    out, _ = tiny_run
    st = torch.load(os.path.join(out, "checkpoints", "best.pt"), weights_only=True)
    for k in ("model", "ema", "optimizer", "scheduler", "rng", "epoch", "step_in_epoch", "global_step", "config"):
        assert k in st
    assert st["global_step"] == 30 and st["epoch"] == 0 and st["step_in_epoch"] == 30
    assert st["scheduler"]["last_step"] == 30
    assert set(st["rng"]) >= {"python", "numpy", "torch"}


def test_validate_reproduces_the_runs_numbers(tiny_run):
    out, _ = tiny_run
    va = records(out, "val")[-1]
    r = run_cli("validate", "--checkpoint", os.path.join(out, "checkpoints", "best.pt"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["val_top1"] == pytest.approx(va["val_top1"])
    assert res["val_top5"] == pytest.approx(va["val_top5"])
    assert res["val_loss"] == pytest.approx(va["val_loss"], rel=1e-5)
    r = run_cli("validate", "--checkpoint", os.path.join(out, "checkpoints", "best.pt"), "--ema")
    assert r.returncode == 0, r.stderr
    assert f"top-1 {va['ema_val_top1']:.2f}%" in r.stdout
    # a plain state dict needs --model and the model's settings
    sd = torch.load(os.path.join(out, "checkpoints", "best.pt"), weights_only=True)["model"]
    plain = os.path.join(out, "plain.pt")
    torch.save(sd, plain)
    r = run_cli("validate", "--checkpoint", plain, "--model", "convnext_atto", *TINY)
    assert r.returncode == 0, r.stderr
    assert f"top-1 {va['val_top1']:.2f}%" in r.stdout


# ----------------------------------------------------------------------------- image folders


def _make_folder(root, classes=("cat", "dog"), per_class=6, size=(20, 24)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class if split == "train" else 2):
                arr = torch.randint(0, 256, (size[0], size[1], 3), generator=g, dtype=torch.uint8)
                arr[..., ci % 3] = 255  # the class is the saturated channel
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(arr.numpy()).save(os.path.join(d, f"{i}.{ext}"))


def test_image_folder_train_and_validate(tmp_path):
    data = str(tmp_path / "data")
    _make_folder(data)
    out = str(tmp_path / "run")
    r = run_cli("train", "--data", data, "--img-size", "16", *TINY, "--epochs", "2", "--batch-size", "4",
                "--workers", "1", "-o", out, "--hflip", "0.5", "--model-arg", "patch_size=2")
    assert r.returncode == 0, r.stdout + r.stderr
    # not quiet: rich progress bars (rendered as text when stderr is not a terminal)
    assert "epoch 1/2" in r.stderr and "epoch 2/2" in r.stderr and "img/s" in r.stderr and "ETA" in r.stderr
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dataset"] == "folder" and cfg["num_classes"] == 2 and cfg["img_size"] == 16
    va = records(out, "val")
    assert [v["val_images"] for v in va] == [4, 4]
    r = run_cli("validate", "--checkpoint", os.path.join(out, "checkpoints", "best.pt"))
    assert r.returncode == 0, r.stderr
    assert "4 folder validation images" in r.stdout


# ----------------------------------------------------------------------------- bad input


def test_unknown_model(tmp_path):
    r = run_cli("train", "--model", "convnext_atoo", "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "unknown model", "convnext_atto")


def test_bad_model_argument(tmp_path):
    r = run_cli("train", "--model-arg", "patch_size=0", "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "patch_size")


def test_missing_data_dir(tmp_path):
    r = run_cli("train", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "data directory not found", "nope")


def test_empty_class_folder(tmp_path):
    data = str(tmp_path / "data")
    _make_folder(data)
    os.makedirs(os.path.join(data, "train", "emu"))
    r = run_cli("train", "--data", data, "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "class folder", "emu", "has no images")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image(tmp_path, workers):
    data = str(tmp_path / "data")
    _make_folder(data)
    bad = os.path.join(data, "train", "dog", "3.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    r = run_cli("train", "--data", data, "--img-size", "16", *TINY, "--model-arg", "patch_size=2",
                "--batch-size", "12", "--epochs", "1",
                "--workers", str(workers), "-q", "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "cannot read image", "3.png")


def test_checkpoint_of_another_architecture(tiny_run, tmp_path):
    out, _ = tiny_run
    best = os.path.join(out, "checkpoints", "best.pt")
    r = run_cli("validate", "--checkpoint", best, "--model", "convnext_femto")
    assert_one_line_error(r, "convnext_atto", "another architecture")
    sd = torch.load(best, weights_only=True)["model"]
    plain = str(tmp_path / "plain.pt")
    torch.save(sd, plain)
    r = run_cli("validate", "--checkpoint", plain, "--model", "convnext_atto")  # full-size atto
    assert_one_line_error(r, "another architecture", "shape mismatch")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a checkpoint")
    r = run_cli("validate", "--checkpoint", str(p), "--model", "convnext_atto")
    assert_one_line_error(r, "cannot read checkpoint", "junk.pt")
    r = run_cli("validate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert_one_line_error(r, "checkpoint not found")


def test_bad_settings(tmp_path):
    r = run_cli("train", "--batch-size", "10", "--accum-steps", "4", "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "multiple of")
    r = run_cli("train", "--resume", "-o", str(tmp_path / "empty"))
    assert_one_line_error(r, "no checkpoint")
    r = run_cli("train", "--amp", "fp16", "--device", "cpu", "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "fp16", "CUDA")


def test_existing_run_and_changed_config_on_resume(tiny_run, tmp_path):
    out, _ = tiny_run
    r = run_cli("train", *TINY, "-o", out)
    assert_one_line_error(r, "already holds a run", "--resume")
    r = run_cli("train", "--resume", "-o", out, "--lr", "0.1")
    assert_one_line_error(r, "another config", "lr")


# ----------------------------------------------------------------------------- kill -9 and resume


def test_resume_after_kill_continues_exactly(tmp_path):
    common = [*TINY, "--epochs", "3", "--batch-size", "32", "--log-every", "1", "--ckpt-every-steps", "4",
              "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1", "--ema", "0.9", "--smoothing", "0.1",
              "--keep-last", "2", "-q", "--no-plot"]
    # 1433 // 32 = 44 steps per epoch, 132 in all
    ref = str(tmp_path / "ref")
    r = run_cli("train", *common, "-o", ref)
    assert r.returncode == 0, r.stderr
    ref_recs = records(ref)

    out = str(tmp_path / "killed")
    p = popen_cli("train", *common, "-o", out)
    ck = os.path.join(out, "checkpoints")
    deadline = time.time() + 240
    killed_at = None
    try:
        while time.time() < deadline and p.poll() is None:
            names = [n for n in (os.listdir(ck) if os.path.isdir(ck) else []) if n.startswith("ckpt-")]
            if any(int(n[5:13]) >= 12 for n in names):
                os.kill(p.pid, signal.SIGKILL)
                killed_at = max(int(n[5:13]) for n in names)
                break
            time.sleep(0.02)
    finally:
        if p.poll() is None and killed_at is None:
            p.kill()
        p.communicate()
    assert killed_at is not None, "the run ended before a checkpoint at step >= 12 appeared"
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "summary.json")), "killed after the run finished"
    before = records(out)
    assert before, "no metrics written before the kill"

    r = run_cli("train", "--resume", "-o", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stderr
    assert not any(n.startswith(".") for n in os.listdir(ck))  # no temporary file left
    got = records(out)
    # every record of the uninterrupted run, once, in order, with the same values
    assert [(x["kind"], x["step"]) for x in got] == [(x["kind"], x["step"]) for x in ref_recs]
    for a, b in zip(got, ref_recs):
        for k in ("loss", "lr", "val_loss", "val_top1", "val_top5", "ema_val_top1", "ema_val_loss"):
            if k in b:
                assert a[k] == b[k], (a, b)
    # the final weights are the same too
    fa = torch.load(os.path.join(out, "checkpoints", "ckpt-00000132.pt"), weights_only=True)
    fb = torch.load(os.path.join(ref, "checkpoints", "ckpt-00000132.pt"), weights_only=True)
    for k, v in fb["model"].items():
        assert torch.equal(fa["model"][k], v), k


_WRITER = r"""
import sys, torch
from fastvis.train.checkpoint import CheckpointManager
mgr = CheckpointManager(sys.argv[1], keep_last=3)
step = 0
while True:
    step += 1
    mgr.save({"format": "fastvis-train-checkpoint", "step": step,
              "w": torch.full((400_000,), float(step))}, step, is_best=step % 3 == 0)
"""


def test_kill_during_checkpoint_writes_leaves_good_files(tmp_path):
    """kill -9 a process that does nothing but write checkpoints, at arbitrary moments:
    every checkpoint file left behind is complete."""
    d = str(tmp_path / "ck")
    for i, delay in enumerate((0.6, 1.3)):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, d], env=_env())
        while not os.path.isdir(d) or not os.listdir(d):  # wait until it writes, then a bit more
            time.sleep(0.01)
            assert p.poll() is None
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        names = [n for n in os.listdir(d) if not n.startswith(".")]
        assert names, "nothing written"
        for n in names:
            st = torch.load(os.path.join(d, n), weights_only=True)
            assert torch.equal(st["w"], torch.full((400_000,), float(st["step"])))


def test_compile_matches_eager(tmp_path):
    """--compile (torch.compile of the model; drop-path draws are graph breaks) computes the
    same steps as eager mode."""
    args = [*TINY, "--drop-path", "0.1", "--max-steps", "3", "--batch-size", "32", "--log-every", "1", "-q",
            "--no-plot"]
    r = run_cli("train", *args, "--compile", "-o", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert "Dynamo does not know" not in r.stderr
    r = run_cli("train", *args, "-o", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr
    c, e = records(str(tmp_path / "c"), "train"), records(str(tmp_path / "e"), "train")
    assert len(c) == 3
    for a, b in zip(c, e):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_bench_train_quick(tmp_path):
    """`fastvis bench train --quick`: both models train, the logits agree, a table is printed
    (timings are not checked: benchmarks are commands, not timed tests)."""
    out = tmp_path / "b.json"
    r = run_cli("bench", "train", "--quick", "--threads", "1", "--num-classes", "10", "--format", "text",
                "--json", str(out), "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "timm/fastvis" in r.stdout and "convnext_atto" in r.stdout
    res = json.loads(out.read_text())["results"][0]
    assert res["rel_err"] < 1e-4
    assert res["fastvis_ms"] > 0 and res["timm_ms"] > 0 and res["ratio"] == pytest.approx(res["timm_ms"] / res["fastvis_ms"])
