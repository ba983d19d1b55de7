"""Two gloo processes under torchrun give the same training as one process with the same
global batch.

What "the same" means here: every random decision (which images form each global batch,
each image's crop and flip, the mixup / cutmix draw and partners, every drop-path
decision) is identical by construction (they are keyed to the seed, the step and the
image's position in the global batch, never to the rank), and so is every configuration
value. What differs is floating-point summation order: DDP all-reduces two half-batch
gradients (gloo sums them, then each is divided by 2) where one process sums the whole batch
in its kernels, and a synchronised BatchNorm sums its statistics in two parts. In float32
these reorderings change a gradient by a few units in the last place (relative ~1e-7); AdamW's
update m / sqrt(v) does not amplify relative gradient errors (except for a parameter whose
gradient is exactly zero in exact arithmetic, see the BatchNorm model), so after 10 steps
the weights agree to ~1e-7. Measured here: losses within 1.1e-7 relative, weights within
6e-8 absolute (8e-7 relative). We assert losses to rel 1e-5 and weights to atol 1e-5 +
rtol 1e-4: about 100 times the rounding noise, and far below what any real divergence
produces (a different data order, mixup pairing or drop-path mask changes the first loss at
the 1e-2 level and the weights by ~1e-3 after one step at lr 2e-3; the control test below
checks that the comparison catches a run with another seed).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastvis

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastvis.__file__)))

COMMON = ["--model-arg", "dims=(8,16,24,32)", "--model-arg", "depths=(1,1,1,1)", "--batch-size", "32",
          "--accum-steps", "2", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--drop-path", "0.2",
          "--clip-grad", "1.0", "--ema", "0.9", "--layer-decay", "0.9", "--max-steps", "10", "--log-every", "1",
          "--epochs", "1", "-q", "--no-plot", "--threads", "1"]

# A user model with BatchNorm, trained through the Python API with SAM (the same script
# runs as one process and as two torchrun processes). The convolutions before BatchNorm have
# no bias, as usual: BatchNorm removes any per-channel constant, so such a bias has an
# exactly-zero gradient, and AdamW turns the pure rounding noise left in it into full-size
# steps of arbitrary sign, different for any two summation orders.
_BN_SCRIPT = r"""
import sys, torch
from torch import nn
from fastvis.train import Trainer, TrainConfig

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
cfg = TrainConfig(batch_size=32, max_steps=8, epochs=1, log_every=1, sam_rho=0.05, mixup=0.5,
                  output=sys.argv[1], plot=False, quiet=True, threads=1)
Trainer(cfg, model=model).fit()
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def _final(out, step=10):
    return torch.load(os.path.join(out, "checkpoints", f"ckpt-{step:08d}.pt"), weights_only=True)


def _compare(a_out, b_out, step):
    ra, rb = _records(a_out), _records(b_out)
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        if x["kind"] == "train":
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)
            assert x["lr"] == y["lr"]
        else:
            assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
            assert x["val_images"] == y["val_images"]
    fa, fb = _final(a_out, step), _final(b_out, step)
    assert fa["world_size"] == 2 and fb["world_size"] == 1
    worst = 0.0
    for k, v in fb["model"].items():
        w = fa["model"][k]
        if v.is_floating_point():
            torch.testing.assert_close(w, v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
            worst = max(worst, float((w - v).abs().max()))
        else:
            assert torch.equal(w, v), k
    if fb.get("ema"):
        for k, v in fb["ema"]["module"].items():
            torch.testing.assert_close(fa["ema"]["module"][k], v, atol=1e-5, rtol=1e-4)
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single, ddp = str(root / "single"), str(root / "ddp")
    r1 = subprocess.run([sys.executable, "-m", "fastvis", "train", *COMMON, "-o", single], capture_output=True,
                        text=True, env=_env(), timeout=600)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _torchrun("-m", "fastvis", "train", *COMMON, "-o", ddp)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    return single, ddp, r2


def test_two_gloo_processes_match_one_process(runs):
    single, ddp, r2 = runs
    assert "2 process(es)" in r2.stderr
    worst = _compare(ddp, single, 10)
    assert worst < 1e-5
    # rank 0 alone wrote the outputs: one set of records, one checkpoint per save
    assert sorted(os.listdir(os.path.join(ddp, "checkpoints"))) == ["best.pt", "ckpt-00000010.pt"]
    assert r2.stdout.count("done: 10 steps") == 1


def test_the_comparison_catches_a_different_run(runs, tmp_path):
    """Control: the same settings with another seed must fail the comparison."""
    single, _, _ = runs
    other = str(tmp_path / "other")
    from test_train_cli import run_cli

    r = run_cli("train", *COMMON, "--seed", "1", "-o", other)
    assert r.returncode == 0, r.stderr
    assert _records(other)[0]["loss"] != pytest.approx(_records(single)[0]["loss"], rel=1e-5)
    with pytest.raises(AssertionError):
        # seed is part of the config: compare weights only
        fa, fb = _final(other), _final(single)
        for k, v in fb["model"].items():
            torch.testing.assert_close(fa["model"][k], v, atol=1e-5, rtol=1e-4)


def test_batchnorm_model_syncs_statistics(tmp_path):
    script = tmp_path / "bn.py"
    script.write_text(_BN_SCRIPT)
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    r1 = subprocess.run([sys.executable, str(script), single], capture_output=True, text=True, env=_env(),
                        timeout=600)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _torchrun(str(script), ddp)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    _compare(ddp, single, 8)
    # the running statistics are those of the global batches (SyncBatchNorm), not of a half
    fa, fb = _final(ddp, 8), _final(single, 8)
    torch.testing.assert_close(fa["model"]["1.running_var"], fb["model"]["1.running_var"], atol=1e-6, rtol=1e-5)
    assert int(fa["model"]["1.num_batches_tracked"]) == 16  # 8 steps x 2 (SAM's two passes)


# Registered before init_distributed, this handler runs after init_distributed's own (atexit
# handlers run last-registered first) and records whether the group was still alive then.
_EXIT_SCRIPT = r"""
import atexit, os, sys, torch
import torch.distributed as dist
from fastvis.train.distributed import init_distributed

def record():
    with open(os.path.join(sys.argv[1], "rank%s" % os.environ["RANK"]), "w") as f:
        f.write("alive" if dist.is_initialized() else "destroyed")

atexit.register(record)
info = init_distributed(torch.device("cpu"))
t = torch.ones(3)
dist.all_reduce(t)
assert info.world_size == 2 and t.tolist() == [2.0, 2.0, 2.0]
"""


def test_process_group_is_destroyed_at_exit(tmp_path):
    """A gloo group left alive at interpreter shutdown can abort the process ("terminate called
    without an active exception", seen in CI); init_distributed's group is destroyed at exit."""
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    r = _torchrun(str(script), str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "destroyed"


def test_shutdown_distributed_is_idempotent(tmp_path):
    import torch.distributed as dist
    from fastvis.train.distributed import shutdown_distributed

    shutdown_distributed()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()
