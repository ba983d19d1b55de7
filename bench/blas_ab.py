"""A/B of the fused blocks' float GEMM: FASTVIS_BLAS=openblas against the default (PyTorch's
MKL when libtorch_cpu exports it), in alternating processes.

Each round starts one process per choice, in turn; each process builds the model, runs two
warm-up steps and then times ``--steps`` steps (inference under no_grad, or a training
step: forward, backward, SGD). Printed per process: the median and the best step in ms.
Alternating whole processes keeps the machine's slow and fast minutes from falling on one
side only.

Run from the repository root after the dev build:

    PYTHONPATH=python python bench/blas_ab.py --model convnext_tiny --batch 8 --mode infer --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _child(model: str, batch: int, mode: str, steps: int) -> None:
    import torch
    import fastvis

    torch.manual_seed(0)
    m = fastvis.create_model(model).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    if mode == "infer":
        m.eval()

        def step():
            with torch.no_grad():
                m(x)
    else:
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        target = torch.randint(0, 1000, (batch,))

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
    step()
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{fastvis.build_info()['blas']:<30} {model} N={batch} {mode}: median "
          f"{statistics.median(times) * 1e3:.0f} ms, best {min(times) * 1e3:.0f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="timed steps per process (default 8 infer, 4 train)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    steps = a.steps or (8 if a.mode == "infer" else 4)
    if a.child:
        _child(a.model, a.batch, a.mode, steps)
        return
    for _ in range(a.rounds):
        for blas in ("openblas", "auto"):
            env = dict(os.environ, FASTVIS_BLAS=blas)
            subprocess.run([sys.executable, __file__, "--child", "--model", a.model, "--batch", str(a.batch),
                            "--mode", a.mode, "--steps", str(steps)], env=env, check=True)


if __name__ == "__main__":
    main()
