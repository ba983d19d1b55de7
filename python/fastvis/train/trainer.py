"""``fastvis.train.Trainer``: the training loop behind ``fastvis train``.

    from fastvis.train import Trainer, TrainConfig
    summary = Trainer(TrainConfig(epochs=30, model_kwargs={"patch_size": 2})).fit()
    summary = Trainer(cfg, model=my_module, train_dataset=ds, val_dataset=vs).fit()
    Trainer(cfg).fit(resume="auto")        # continue from <output>/checkpoints

One optimizer step (``accum_steps`` micro-batches per rank, the global batch over all
ranks): draw the batch's mixup / cutmix from ``(seed, "mix", step)``; for each micro-batch,
forward under autocast (if AMP) with drop-path decisions keyed by ``(seed, step, pass,
call, position in the global batch)``, soft-target cross entropy, backward (DDP all-reduces
the gradients on the last micro-batch only); with SAM, climb to ``w + e`` and run the
micro-batches again; clip the global gradient norm; optimizer step; schedule step; EMA
update. Every random decision is a function of the seed and the step, which is what makes
``--resume`` exact and a distributed run equal to a single process (see ``data.py``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .checkpoint import (FORMAT, VERSION, CheckpointError, CheckpointManager, atomic_write_bytes, load_checkpoint_file,
                         rng_state, set_rng_state)
from .config import ConfigError, TrainConfig
from .data import (AugmentedDataset, BatchSchedule, DataError, build_datasets, dataset_defaults, derive_seed,
                   eval_loader, generator, train_loader)
from .distributed import DistInfo, all_reduce_sum, barrier, convert_sync_batchnorm, has_batchnorm, init_distributed
from .ema import ModelEma
from .optim import SAM, WarmupCosine, build_optimizer, unwrap_model
from .report import MetricsLog, Progress, plot_metrics, read_metrics
from .transforms import EvalTransform, Mixer, TrainTransform, soft_target_cross_entropy

__all__ = ["Trainer", "TrainingError", "EXECUTION_KEYS", "build_model", "load_model_weights", "evaluate_model"]


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, an op failing under AMP, ...): one line."""


# Settings that do not change what is computed: a resumed run may give new values.
EXECUTION_KEYS = frozenset({"workers", "threads", "quiet", "plot", "keep_last", "max_steps", "log_every",
                            "ckpt_every_steps", "output", "device"})


def _device(spec: str, info_local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", info_local_rank)
    return dev


def build_model(cfg: TrainConfig) -> nn.Module:
    """``fastvis.create_model`` for a resolved config (ValueError for an unknown name)."""
    from ..models import create_model

    kw = dict(cfg.model_kwargs)
    if cfg.drop_path > 0:
        kw["drop_path_rate"] = cfg.drop_path
    return create_model(cfg.model, pretrained=cfg.pretrained, num_classes=cfg.num_classes, **kw)


def load_model_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Strict load; a mismatch becomes a one-line CheckpointError naming the first problems."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]} (checkpoint vs model)")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CheckpointError(f"{source} holds weights of another architecture than {type(model).__name__}: "
                              + "; ".join(parts))
    model.load_state_dict(state_dict)


def _ops_frame(tb) -> Optional[str]:
    """The outermost fastvis op function in a traceback, as 'fastvis.ops.<module>.<function>'."""
    for frame, _ in traceback.walk_tb(tb):
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/fastvis/ops/" in path:
            mod = os.path.splitext(os.path.basename(path))[0]
            return f"fastvis.ops.{mod}.{frame.f_code.co_name}"
    return None


@torch.no_grad()
def evaluate_model(module: nn.Module, dataset, transform, batch_size: int, device: torch.device, num_classes: int,
                   channels_last: bool = True, amp_dtype=None, dist_info: Optional[DistInfo] = None,
                   workers: int = 0) -> Dict[str, float]:
    """Mean cross entropy, top-1 and top-5 accuracy (%) of ``module`` on ``dataset``; in a
    distributed run each rank takes every W-th image and the sums are all-reduced."""
    info = dist_info or DistInfo()
    was_training = module.training
    module.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64)
    for x, y in eval_loader(dataset, transform, batch_size, info.rank, info.world_size, workers):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            out = module(x)
        out = out.float()
        if out.dim() != 2 or out.shape[1] != num_classes:
            raise TrainingError(f"the model gives outputs of shape {tuple(out.shape)}, expected (N, {num_classes})")
        if int(y.max()) >= num_classes:
            raise TrainingError(f"label {int(y.max())} out of range for a {num_classes}-class model")
        loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
        hit = out.topk(k, dim=1).indices == y[:, None]
        sums += torch.tensor([float(loss), float(hit[:, 0].sum()), float(hit.any(1).sum()), float(len(y))],
                             dtype=torch.float64)
    module.train(was_training)
    sums = all_reduce_sum(sums, info)
    n = max(1.0, float(sums[3]))
    return {"val_loss": float(sums[0]) / n, "val_top1": 100.0 * float(sums[1]) / n,
            "val_top5": 100.0 * float(sums[2]) / n, "val_images": int(sums[3])}


class Trainer:
    """Trains ``config.model`` (or ``model``) on ``config.dataset`` (or the given datasets).

    Args:
        config: a :class:`TrainConfig` (resolved here against the data and world size).
        model: an ``nn.Module`` to train instead of ``create_model(config.model)``; its
            outputs must be (N, num_classes) logits.
        train_dataset, val_dataset: datasets of ``(image, label)`` with (3, H, W) images,
            uint8 or float in [0, 1], instead of ``config.dataset``.
        progress: show progress / write outputs on rank 0 (False: silent, for tests).
    """

    def __init__(self, config: TrainConfig, model: Optional[nn.Module] = None, train_dataset=None,
                 val_dataset=None, progress: bool = True):
        from .distributed import env_world_size

        world = env_world_size()
        cfg0 = config
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _device(cfg0.device, local_rank)
        self.dist: DistInfo = init_distributed(self.device)
        threads = cfg0.threads
        if threads is None and self.dist.distributed and self.device.type == "cpu":
            threads = max(1, (os.cpu_count() or 1) // self.dist.local_world_size)
        if threads is not None:
            torch.set_num_threads(threads)

        # ---- data
        if (train_dataset is None) != (val_dataset is None):
            raise ValueError("Trainer: give both train_dataset and val_dataset, or neither")
        if train_dataset is None:
            cfg_probe = cfg0.resolved(world, dataset_defaults(cfg0.dataset)) if cfg0.dataset != "folder" else None
            if cfg0.dataset == "folder":
                if not cfg0.data_dir:
                    raise ConfigError("dataset 'folder' needs a data directory (--data DIR)")
                from .data import ImageFolderDataset

                tr = ImageFolderDataset(cfg0.data_dir, "train")
                va = ImageFolderDataset(cfg0.data_dir, "val", classes=tr.classes)
                dd = dict(dataset_defaults("folder"), num_classes=tr.num_classes)
                self.config = cfg0.resolved(world, dd)
                if self.config.num_classes != tr.num_classes:
                    raise ConfigError(f"num_classes {self.config.num_classes} differs from the {tr.num_classes} "
                                      f"class folders of {cfg0.data_dir}/train")
                self.train_base, self.val_base = tr, va
            else:
                self.config = cfg_probe
                self.train_base, self.val_base = build_datasets(self.config)
        else:
            dd = {}
            img0 = train_dataset[0][0]
            dd["img_size"] = int(img0.shape[-1])
            nc = getattr(train_dataset, "num_classes", None) or (
                len(train_dataset.classes) if hasattr(train_dataset, "classes") else None)
            if nc is not None:
                dd["num_classes"] = int(nc)
            self.config = cfg0.replace(dataset="custom", data_dir=None).resolved(world, dd)
            self.train_base, self.val_base = train_dataset, val_dataset
        cfg = self.config
        self.is_main = self.dist.is_main
        self.progress_enabled = progress and self.is_main

        self.schedule = BatchSchedule(len(self.train_base), cfg.batch_size, self.dist.world_size, self.dist.rank,
                                      cfg.accum_steps, cfg.seed)
        self.train_aug = AugmentedDataset(self.train_base, TrainTransform(cfg.img_size, cfg.scale, cfg.ratio, cfg.hflip,
                                                                          cfg.mean, cfg.std), cfg.seed)
        self.eval_tf = EvalTransform(cfg.img_size, cfg.crop_pct, cfg.mean, cfg.std)
        self.mixer = Mixer(cfg.num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.switch_prob, cfg.label_smoothing)

        # ---- model
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        if model is None:
            model = build_model(cfg)
            self.model_name = cfg.model
        else:
            self.model_name = f"custom:{type(model).__name__}"
            self.config = cfg = cfg.replace(model=self.model_name)
        if self.dist.distributed and has_batchnorm(model):
            model = convert_sync_batchnorm(model, self.device)
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module (what checkpoints hold)
        self.ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None

        # ---- optimisation
        self.optimizer = build_optimizer(model, cfg)
        self.steps_per_epoch = self.schedule.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.scheduler = WarmupCosine(self.optimizer, cfg.lr, self.total_steps,
                                      int(round(cfg.warmup_epochs * self.steps_per_epoch)), cfg.warmup_lr, cfg.min_lr)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        # ---- wrappers
        run_model: nn.Module = model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            run_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            run_model = torch.compile(run_model)
        self.run_model = run_model

        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_top1 = -1.0
        self.last_val: Dict[str, float] = {}
        self.out_dir = cfg.output
        self.ckpt: Optional[CheckpointManager] = None

    # ------------------------------------------------------------------ pieces

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _drop_path_source(self, step: int, pass_i: int, micro: int):
        start, n = self.schedule.positions(self.step_in_epoch, micro)
        seed, batch = self.config.seed, self.config.batch_size
        counter = [0]

        def source(count: int, keep: float) -> torch.Tensor:
            k = counter[0]
            counter[0] += 1
            if count != n:
                raise RuntimeError(f"drop path: batch of {count} where the schedule has {n}")
            u = torch.rand(batch, generator=generator(seed, "droppath", step, pass_i, k), dtype=torch.float64)
            return (u[start:start + n] < keep).float()

        from ..nn.convnext import drop_path_source

        if self.config.compile:
            # seeded generators are not traceable: under torch.compile each draw is a graph
            # break (the blocks themselves are opaque custom ops anyway)
            source = torch.compiler.disable(source)
        return drop_path_source(source)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward_backward(self, batches, step: int, pass_i: int) -> torch.Tensor:
        cfg = self.config
        total = torch.zeros((), dtype=torch.float64)
        a = len(batches)
        for m, (x, t) in enumerate(batches):
            last = m == a - 1
            sync = contextlib.nullcontext() if (last or not self.dist.distributed) else self.run_model.no_sync()
            with sync, self._drop_path_source(step, pass_i, m):
                with self._autocast():
                    out = self.run_model(x)
                loss = soft_target_cross_entropy(out, t)
                scaled = loss / a
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total += loss.detach().double().cpu() / a
        return total

    def train_step(self, micro_batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step on this rank's micro-batches; returns the local mean loss."""
        cfg = self.config
        step = self.global_step
        torch.manual_seed(derive_seed(cfg.seed, "torch", step, self.dist.rank))
        h, w = micro_batches[0][0].shape[-2:]
        mix = self.mixer.draw(np.random.default_rng(derive_seed(cfg.seed, "mix", step)), h, w)
        batches = []
        for x, y in micro_batches:
            xm, t = self.mixer.apply(x, y, mix)
            batches.append((self._to_device(xm), t.to(self.device)))
        self.run_model.train()
        try:
            loss = self._forward_backward(batches, step, 0)
            if isinstance(self.optimizer, SAM):
                self.optimizer.first_step()
                self.optimizer.zero_grad(set_to_none=True)
                self._forward_backward(batches, step, 1)
        except TypeError as e:
            op = _ops_frame(e.__traceback__)
            if self.amp_dtype is not None and op is not None:
                raise TrainingError(
                    f"AMP ({cfg.amp}) is not usable with this model: {op} raised under autocast: "
                    f"{' '.join(str(e).split())} (a gap of that fastvis op; train without --amp)") from e
            raise
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        if isinstance(self.optimizer, SAM):
            self.optimizer.second_step()
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.global_step += 1
        return loss

    def evaluate(self, module: Optional[nn.Module] = None, batch_size: Optional[int] = None) -> Dict[str, float]:
        """Loss, top-1 and top-5 (in %) over the validation set (all ranks' shares summed)."""
        return evaluate_model(self.run_model if module is None else module, self.val_base, self.eval_tf,
                              batch_size or max(8, self.schedule.micro_batch), self.device, self.config.num_classes,
                              self.config.channels_last, self.amp_dtype, self.dist, self.config.workers)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION,
            "model_name": self.model_name, "model_class": type(self.model).__name__,
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.ema_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_top1": self.best_top1, "metrics": dict(self.last_val),
            "world_size": self.dist.world_size,
            "classes": [str(c) for c in getattr(self.train_base, "classes", [])],
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, st: Dict[str, Any], source: str = "checkpoint") -> None:
        if not isinstance(st, dict) or st.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not a fastvis training checkpoint")
        theirs = st.get("config", {})
        mine = self.config.to_dict()
        diff = sorted(k for k in mine if k not in EXECUTION_KEYS and k in theirs and theirs[k] != mine[k])
        if diff:
            k = diff[0]
            raise CheckpointError(
                f"{source} was made with another config ({', '.join(diff)} differ, e.g. {k}: "
                f"{theirs[k]!r} in the checkpoint, {mine[k]!r} now); a resumed run keeps its config")
        load_model_weights(self.model, st["model"], source)
        if self.ema is not None:
            if st.get("ema") is None:
                raise CheckpointError(f"{source} has no EMA weights")
            self.ema.load_ema_state(st["ema"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        self.epoch, self.step_in_epoch = int(st["epoch"]), int(st["step_in_epoch"])
        self.global_step = int(st["global_step"])
        self.best_top1 = float(st.get("best_top1", -1.0))
        self.last_val = dict(st.get("metrics") or {})

    def save_checkpoint(self, is_best: bool = False) -> Optional[str]:
        if not self.is_main or self.ckpt is None:
            return None
        return self.ckpt.save(self.state_dict(), self.global_step, is_best)

    # ------------------------------------------------------------------ the loop

    def _resume_state(self, resume) -> Tuple[str, Dict[str, Any]]:
        if isinstance(resume, tuple):  # (path, state) already loaded by the caller
            return resume
        path = os.path.join(self.out_dir, "checkpoints") if resume == "auto" else resume
        if os.path.isdir(path):
            sub = os.path.join(path, "checkpoints")
            found = CheckpointManager(sub if os.path.isdir(sub) else path, clean=False).latest()
            if found is None:
                raise CheckpointError(f"--resume: no checkpoint in {path}")
            return found
        if resume == "auto":
            raise CheckpointError(f"--resume: no checkpoint in {path}")
        return path, load_checkpoint_file(path)

    def fit(self, resume: Optional[str] = None) -> Dict[str, Any]:
        """Runs the training (from a checkpoint with ``resume``: ``"auto"`` for the output
        directory's latest, or a file / run directory); returns the summary."""
        cfg = self.config
        t_start = time.perf_counter()
        ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        resumed_from = None
        if resume is not None:
            resumed_from, st = self._resume_state(resume)
            self.load_state_dict(st, resumed_from)
        elif self.is_main and os.path.isdir(ckpt_dir) and CheckpointManager(ckpt_dir).list():
            raise ConfigError(f"output directory {self.out_dir} already holds a run (checkpoints/); "
                              "resume it with --resume or choose another --output")
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            self.ckpt = CheckpointManager(ckpt_dir, cfg.keep_last)
            cfg.save(self.out_dir)
        metrics = MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"),
                             self.global_step if resume is not None else None, enabled=self.is_main)
        prog = Progress(enabled=self.progress_enabled, quiet=cfg.quiet)
        nparams = sum(p.numel() for p in self.model.parameters())
        prog.say(f"fastvis train: {self.model_name} ({nparams / 1e6:.2f}M parameters) on {cfg.dataset} "
                 f"({len(self.train_base)} train / {len(self.val_base)} val images, {cfg.num_classes} classes, "
                 f"{cfg.img_size}x{cfg.img_size}); {cfg.epochs} epochs x {self.steps_per_epoch} steps of "
                 f"{cfg.batch_size} images; {self.dist.world_size} process(es) on {self.device}, "
                 f"{torch.get_num_threads()} thread(s) each; output {self.out_dir}")
        if resumed_from:
            prog.say(f"resumed from {resumed_from} (epoch {self.epoch + 1}, step {self.global_step})")

        stop = cfg.max_steps is not None and self.global_step >= cfg.max_steps
        win_loss = torch.zeros((), dtype=torch.float64)
        win_steps, win_t0 = 0, time.perf_counter()
        try:
            while self.epoch < cfg.epochs and not stop:
                epoch = self.epoch
                loader = train_loader(self.train_aug, self.schedule, epoch, self.step_in_epoch, cfg.workers)
                it = iter(loader)
                prog.start_epoch(epoch, cfg.epochs, self.steps_per_epoch, self.step_in_epoch)
                while self.step_in_epoch < self.steps_per_epoch:
                    micro = [next(it) for _ in range(cfg.accum_steps)]
                    lr = self.scheduler.current_lr
                    loss = self.train_step(micro)
                    self.step_in_epoch += 1
                    win_loss += loss
                    win_steps += 1
                    end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                    stop = cfg.max_steps is not None and self.global_step >= cfg.max_steps
                    if self.global_step % cfg.log_every == 0 or end_of_epoch or stop:
                        mean = float(all_reduce_sum(win_loss, self.dist)) / (win_steps * self.dist.world_size)
                        if not math.isfinite(mean):
                            raise TrainingError(f"the training loss is {mean} at step {self.global_step}; "
                                                "lower --lr, or use --clip-grad")
                        now = time.perf_counter()
                        rec = {"kind": "train", "step": self.global_step, "epoch": epoch, "loss": mean, "lr": lr,
                               "img_s": win_steps * cfg.batch_size / max(now - win_t0, 1e-9), "time": time.time()}
                        metrics.write(rec)
                        prog.update(self.step_in_epoch, mean, lr, rec["img_s"])
                        prog.record(rec, self.total_steps)
                        win_loss.zero_()
                        win_steps, win_t0 = 0, time.perf_counter()
                    if stop or end_of_epoch:
                        break
                    if cfg.ckpt_every_steps and self.global_step % cfg.ckpt_every_steps == 0:
                        self.save_checkpoint()
                del it, loader
                prog.end_epoch()
                if end_of_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                last = self.epoch >= cfg.epochs or stop
                is_best = False
                if (end_of_epoch and self.epoch % cfg.eval_every == 0) or last:
                    val = self.evaluate()
                    rec = {"kind": "val", "step": self.global_step, "epoch": epoch, **val}
                    if self.ema is not None:
                        ev = self.evaluate(self.ema.module)
                        rec.update({f"ema_{k}": v for k, v in ev.items()})
                    self.last_val = {k: v for k, v in rec.items() if k not in ("kind",)}
                    is_best = val["val_top1"] > self.best_top1
                    if is_best:
                        self.best_top1 = val["val_top1"]
                    metrics.write(rec)
                    msg = (f"epoch {epoch + 1}/{cfg.epochs} (step {self.global_step}): val loss {val['val_loss']:.4f}  "
                           f"top-1 {val['val_top1']:.2f}%  top-5 {val['val_top5']:.2f}%")
                    if self.ema is not None:
                        msg += f"  EMA top-1 {rec['ema_val_top1']:.2f}%"
                    prog.say(msg)
                self.save_checkpoint(is_best)
        finally:
            metrics.close()
            prog.end_epoch()
        wall = time.perf_counter() - t_start
        summary = {"model": self.model_name, "epochs_done": self.epoch, "steps": self.global_step,
                   "wall_time_s": wall, "best_val_top1": self.best_top1, **self.last_val,
                   "world_size": self.dist.world_size, "output": self.out_dir}
        if self.is_main:
            atomic_write_bytes(os.path.join(self.out_dir, "summary.json"),
                               (json.dumps(summary, indent=2) + "\n").encode())
            if cfg.plot:
                why = plot_metrics(read_metrics(os.path.join(self.out_dir, "metrics.jsonl")),
                                   os.path.join(self.out_dir, "plot.png"))
                if why:
                    prog.say(why)
        # Every rank returns once the run is complete: rank 0 has written the last
        # checkpoint and the summary (so any rank may read them), and no rank starts
        # tearing down its process group while another still works.
        barrier(self.dist)
        return summary
