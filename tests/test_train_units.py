"""Unit tests of fastvis.train: mixup / cutmix, the losses, SAM, the lr schedule, parameter
groups with layer-wise lr decay, EMA, the batch schedule, transforms, checkpoints.

Expected values are computed by hand in the tests (written out as numbers or as the
closed-form expression), not by calling the code under test a second time.
"""
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastvis
from fastvis.train import optim as topt
from fastvis.train.checkpoint import (CheckpointManager, atomic_torch_save, load_checkpoint_file, rng_state,
                                      set_rng_state)
from fastvis.train.config import ConfigError, TrainConfig
from fastvis.train.data import BatchSchedule, DataError, SyntheticDataset, derive_seed, generator
from fastvis.train.ema import ModelEma
from fastvis.train.transforms import (EvalTransform, Mixer, MixParams, TrainTransform, cutmix_box, one_hot_smooth,
                                      random_resized_crop_params, soft_target_cross_entropy)

# ----------------------------------------------------------------------------- mixing


def test_mixup_hand_computed():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()  # image i == i
    y = torch.tensor([0, 1, 2, 0])
    m = Mixer(num_classes=3, mixup_alpha=1.0, label_smoothing=0.1)
    xm, t = m.apply(x, y, MixParams("mixup", 0.3))
    # pairs (0, 1) and (2, 3): 0.3 * self + 0.7 * partner
    assert xm[:, 0, 0, 0].tolist() == pytest.approx([0.7, 0.3 + 0.7 * 0, 0.3 * 2 + 0.7 * 3, 0.3 * 3 + 0.7 * 2])
    assert xm[0, 0, 0, 0].item() == pytest.approx(0.3 * 0 + 0.7 * 1)
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    t0 = [0.3 * on + 0.7 * off, 0.3 * off + 0.7 * on, off]          # classes 0 (self) and 1 (partner)
    t2 = [0.3 * off + 0.7 * on, off, 0.3 * on + 0.7 * off]          # class 2 (self) and 0 (partner)
    assert t[0].tolist() == pytest.approx(t0)
    assert t[2].tolist() == pytest.approx(t2)
    assert t.sum(1).tolist() == pytest.approx([1.0] * 4)


def test_cutmix_hand_computed():
    x = torch.zeros(2, 1, 4, 4)
    x[1] = 1.0
    y = torch.tensor([0, 1])
    m = Mixer(num_classes=2, cutmix_alpha=1.0)
    xm, t = m.apply(x, y, MixParams("cutmix", 0.75, (1, 3, 0, 2)))   # a 2x2 box of 16 pixels
    expect0 = torch.zeros(4, 4)
    expect0[1:3, 0:2] = 1.0
    assert torch.equal(xm[0, 0], expect0)
    assert torch.equal(xm[1, 0], 1.0 - expect0)
    assert t.flatten().tolist() == pytest.approx([0.75, 0.25, 0.25, 0.75])
    assert torch.equal(x[0], torch.zeros(1, 4, 4))  # the input is not modified


def test_cutmix_box_and_lam_correction():
    class FixedRng:
        def __init__(self, ints):
            self.ints = list(ints)

        def integers(self, lo, hi):
            return self.ints.pop(0)

    # H = W = 10, lam 0.64: sides 10 * 0.6 = 6; centre (1, 8): y 1-3 -> clip 0 .. 1+3 = 4, x 8-3=5 .. 11 -> 10
    assert cutmix_box(10, 10, 0.64, FixedRng([1, 8])) == (0, 4, 5, 10)
    m = Mixer(num_classes=10, cutmix_alpha=1.0)
    p = m.draw(np.random.default_rng(3), 10, 12)
    y0, y1, x0, x1 = p.box
    assert p.kind == "cutmix"
    assert p.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 120)


def test_mixer_draw_modes():
    rng = np.random.default_rng(0)
    assert Mixer(10).draw(rng, 8, 8).kind == "none"
    assert Mixer(10, mixup_alpha=0.8, prob=0.0).draw(rng, 8, 8).kind == "none"
    kinds = {Mixer(10, mixup_alpha=0.8, cutmix_alpha=1.0).draw(np.random.default_rng(s), 8, 8).kind for s in range(20)}
    assert kinds == {"mixup", "cutmix"}
    p = Mixer(10, mixup_alpha=0.8).draw(np.random.default_rng(5), 8, 8)
    assert p.kind == "mixup" and 0 <= p.lam <= 1
    # the same generator state gives the same decision
    assert Mixer(10, mixup_alpha=0.8).draw(np.random.default_rng(5), 8, 8) == p


def test_soft_target_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])   # softmax (0.25, 0.75)
    target = torch.tensor([[0.5, 0.5]])
    expect = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_target_cross_entropy(logits, target).item() == pytest.approx(expect, rel=1e-6)


def test_smoothed_one_hot_matches_torch_label_smoothing():
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ours = soft_target_cross_entropy(logits, one_hot_smooth(y, 5, 0.1))
    ref = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


# ----------------------------------------------------------------------------- SAM


def test_sam_hand_computed():
    # f(w) = 0.5 * (w0^2 + 4 w1^2) at w = (1, 1): g = (1, 4), |g| = sqrt(17)
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    rho, lr = 0.1, 0.5
    sam = topt.SAM(torch.optim.SGD([w], lr=lr), rho=rho)

    def closure():
        loss = 0.5 * (a * w * w).sum()
        loss.backward()
        return loss

    loss = sam.step(closure)
    assert loss.item() == pytest.approx(2.5)
    n = math.sqrt(17.0)
    e = (rho * 1 / n, rho * 4 / n)
    g2 = (1.0 * (1 + e[0]), 4.0 * (1 + e[1]))               # gradient at w + e
    assert w.tolist() == pytest.approx([1 - lr * g2[0], 1 - lr * g2[1]], rel=1e-12)


def test_asam_hand_computed():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    rho, lr = 0.2, 0.1
    sam = topt.SAM(torch.optim.SGD([w], lr=lr), rho=rho, adaptive=True)
    # f(w) = w0 + 3 w1 (g = (1, 3) everywhere); ASAM: e = rho * w^2 g / |w g|
    sam.zero_grad()
    (w[0] + 3 * w[1]).backward()
    sam.first_step()
    wg = math.sqrt((2 * 1) ** 2 + (-1 * 3) ** 2)
    assert w.tolist() == pytest.approx([2 + rho * 4 * 1 / wg, -1 + rho * 1 * 3 / wg], rel=1e-12)
    sam.zero_grad()
    (w[0] + 3 * w[1]).backward()
    sam.second_step()
    assert w.tolist() == pytest.approx([2 - lr * 1, -1 - lr * 3], rel=1e-12)


def test_sam_state_dict_is_the_base_optimizers():
    w = torch.nn.Parameter(torch.ones(3))
    base = torch.optim.AdamW([w], lr=0.1)
    sam = topt.SAM(base, rho=0.05)
    w.grad = torch.ones(3)
    sam.first_step()
    sam.second_step()
    assert sam.state_dict()["state"][0]["step"] == base.state_dict()["state"][0]["step"]


# ----------------------------------------------------------------------------- schedule and groups


def test_warmup_cosine_values():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr_scale": 0.5}], lr=1.0)
    s = topt.WarmupCosine(opt, lr=1.0, total_steps=10, warmup_steps=2, warmup_lr=0.0, min_lr=0.1)
    seen = []
    for _ in range(11):
        seen.append(s.current_lr)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * s.current_lr)
        s.step()
    assert seen[0] == 0.0 and seen[1] == pytest.approx(0.5) and seen[2] == pytest.approx(1.0)
    # half way through the 8 cosine steps: (1 + 0.1) / 2
    assert seen[6] == pytest.approx(0.55)
    assert seen[10] == pytest.approx(0.1)
    st = s.state_dict()
    s2 = topt.WarmupCosine(opt, lr=1.0, total_steps=10, warmup_steps=2, warmup_lr=0.0, min_lr=0.1)
    s2.load_state_dict(st)
    assert s2.current_lr == pytest.approx(0.1)


def _tiny_convnext():
    return fastvis.create_model("convnext_atto", num_classes=3, dims=(8, 16, 24, 32), depths=(1, 2, 1, 1))


def test_param_groups_weight_decay_rule():
    m = _tiny_convnext()
    groups = topt.param_groups(m, 0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    params = dict(m.named_parameters())
    assert decay | no_decay == set(params)
    for n in no_decay:
        assert params[n].ndim <= 1, n
    for n in decay:
        assert params[n].ndim >= 2, n
    assert "stages.0.blocks.0.gamma" in no_decay and "stem.0.weight" in decay


def test_layer_decay_groups():
    m = _tiny_convnext()  # 5 blocks: layers stem 0, blocks 1..5, head 6
    ids, n = topt.layer_ids(m)
    assert n == 7
    assert ids["stem.0.weight"] == 0
    assert ids["stages.0.blocks.0.conv_dw.weight"] == 1
    assert ids["stages.1.downsample.1.weight"] == 2 == ids["stages.1.blocks.0.mlp.fc1.weight"]
    assert ids["stages.1.blocks.1.gamma"] == 3
    assert ids["stages.3.blocks.0.norm.weight"] == 5
    assert ids["head.fc.weight"] == 6 == ids["head.norm.bias"]
    d = 0.5
    groups = topt.param_groups(m, 0.05, layer_decay=d)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    assert scale["head.fc.weight"] == 1.0
    assert scale["stem.0.weight"] == pytest.approx(d ** 6)
    assert scale["stages.1.blocks.1.gamma"] == pytest.approx(d ** 3)
    with pytest.raises(ValueError, match="ConvNeXt-style"):
        topt.param_groups(torch.nn.Linear(3, 3), 0.05, layer_decay=0.8)


def test_build_optimizer_kinds():
    m = _tiny_convnext()
    cfg = TrainConfig(opt="sgd", momentum=0.8).resolved(1, {"img_size": 32, "num_classes": 3})
    o = topt.build_optimizer(m, cfg)
    assert isinstance(o, torch.optim.SGD) and o.param_groups[0]["momentum"] == 0.8
    o = topt.build_optimizer(m, cfg.replace(opt="adamw", sam_rho=0.05))
    assert isinstance(o, topt.SAM) and isinstance(o.base_optimizer, torch.optim.AdamW)


# ----------------------------------------------------------------------------- EMA


def test_ema_hand_computed():
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema = ModelEma(m, decay=0.5, warmup=False)
    with torch.no_grad():
        m.weight.fill_(4.0)
    ema.update(m)
    assert ema.module.weight.item() == pytest.approx(3.0)   # 0.5 * 2 + 0.5 * 4
    ema2 = ModelEma(m, decay=0.99, warmup=True)
    assert ema2.current_decay() == pytest.approx(0.1)       # (1 + 0) / (10 + 0)


# ----------------------------------------------------------------------------- data


def test_batch_schedule_is_world_size_invariant():
    n, b = 37, 8
    single = BatchSchedule(n, b, world_size=1, rank=0, accum_steps=1, seed=3)
    assert single.steps_per_epoch == 4
    one = single.micro_batches(epoch=2)
    for world, accum in ((2, 1), (2, 2), (4, 1)):
        parts = [BatchSchedule(n, b, world, r, accum, seed=3).micro_batches(epoch=2) for r in range(world)]
        for s in range(4):
            merged = []
            for r in range(world):
                for mb in parts[r][s * accum:(s + 1) * accum]:
                    merged += mb
            # rank r's micro-batches hold consecutive positions of the global batch
            assert sorted(merged, key=lambda k: k[2]) == one[s]
    # resuming at a step continues with exactly the remaining batches
    assert single.micro_batches(2, start_step=3) == one[3:]
    perm = single.permutation(2)
    assert sorted(perm.tolist()) == list(range(n)) and not torch.equal(perm, single.permutation(3))


def test_batch_schedule_too_small():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchSchedule(5, 8)


def test_derive_seed_stable():
    assert derive_seed(0, "aug", 1, 2) == derive_seed(0, "aug", 1, 2)
    assert derive_seed(0, "aug", 1, 2) != derive_seed(0, "aug", 1, 3)
    assert torch.equal(torch.rand(3, generator=generator(1, "x")), torch.rand(3, generator=generator(1, "x")))


def test_random_resized_crop_params_within_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(30, 50, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50 and h > 0 and w > 0
    # impossible ratio -> the documented centre-crop fallback
    assert random_resized_crop_params(10, 100, (0.9, 1.0), (1.0, 1.0), g) == (0, 45, 10, 10)


def test_train_transform_deterministic_and_flip():
    img = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    tf = TrainTransform(16, scale=(1.0, 1.0), ratio=(24 / 20, 24 / 20), hflip=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    a = tf(img, torch.Generator().manual_seed(1))
    b = tf(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    noflip = TrainTransform(16, scale=(1.0, 1.0), ratio=(24 / 20, 24 / 20), hflip=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(noflip(img, torch.Generator().manual_seed(1)).flip(-1), a)


def test_eval_transform():
    img = torch.full((3, 40, 60), 255, dtype=torch.uint8)
    img[:, :, :10] = 0
    out = EvalTransform(16, crop_pct=0.8, mean=(0.5,) * 3, std=(0.5,) * 3)(img)
    # short side 40 -> 20 (60 -> 30), centre crop 16 of 30 columns: cols 7..22, all from the 255 part
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out, torch.ones_like(out))


def test_synthetic_dataset_is_a_function_of_the_index():
    ds = SyntheticDataset(10, num_classes=3, size=8, seed=1)
    assert torch.equal(ds[4][0], ds[4][0]) and ds[4][1] == 1
    assert not torch.equal(ds[4][0], ds[5][0])


# ----------------------------------------------------------------------------- config


def test_config_checks():
    dd = {"img_size": 32, "num_classes": 10}
    with pytest.raises(ConfigError, match="multiple of world size"):
        TrainConfig(batch_size=10, accum_steps=4).resolved(1, dd)
    with pytest.raises(ConfigError, match="even"):
        TrainConfig(batch_size=6, mixup=0.8).resolved(2, dd)
    with pytest.raises(ConfigError, match="opt"):
        TrainConfig(opt="lion").resolved(1, dd)
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"lrr": 1})
    c = TrainConfig().resolved(1, {"img_size": 32, "num_classes": 10, "hflip": 0.0, "scale": (0.35, 1.0)})
    assert c.hflip == 0.0 and c.scale == (0.35, 1.0) and c.mean == (0.485, 0.456, 0.406)
    assert TrainConfig.from_dict(c.to_dict()) == c


# ----------------------------------------------------------------------------- drop path hook


def test_drop_path_source_controls_the_block():
    from fastvis.nn.convnext import drop_path_source

    blk = fastvis.nn.ConvNeXtBlock(8, drop_path=0.5).train()
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with drop_path_source(lambda n, keep: torch.zeros(n)):
        y = blk(x)
    assert torch.equal(y, x)  # every residual branch dropped
    calls = []

    def keep_first_two(n, keep):
        calls.append((n, keep))
        return torch.tensor([1.0, 1.0, 0.0, 0.0])

    with drop_path_source(keep_first_two):
        y = blk(x)
    assert calls == [(4, 0.5)]
    assert torch.equal(y[2:], x[2:]) and not torch.equal(y[:2], x[:2])


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_manager_keeps_last_k_and_best(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ck"), keep_last=2)
    for step, best in ((1, True), (2, False), (3, True), (4, False)):
        mgr.save({"format": "fastvis-train-checkpoint", "step": step}, step, is_best=best)
    assert [s for s, _ in mgr.list()] == [4, 3]
    assert load_checkpoint_file(mgr.best_path)["step"] == 3
    path, st = mgr.latest()
    assert st["step"] == 4 and path.endswith("ckpt-00000004.pt")
    # a leftover temporary file of a killed writer is removed at the next start
    stale = tmp_path / "ck" / ".ckpt-00000005.pt.tmp-999"
    stale.write_bytes(b"partial")
    CheckpointManager(str(tmp_path / "ck"))
    assert not stale.exists()


def test_atomic_save_failure_leaves_the_old_file(tmp_path, monkeypatch):
    p = str(tmp_path / "a.pt")
    atomic_torch_save({"v": 1}, p)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_torch_save({"v": 2}, p)
    monkeypatch.undo()
    assert load_checkpoint_file(p)["v"] == 1
    assert os.listdir(tmp_path) == ["a.pt"]


def test_rng_state_roundtrip():
    st = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(st)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


# ----------------------------------------------------------------------------- the Trainer API


def _api_config(tmp_path, **kw):
    base = dict(batch_size=16, max_steps=2, epochs=1, log_every=1, output=str(tmp_path / "run"), plot=False,
                quiet=True, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _small_cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.GELU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))


def test_trainer_user_model_and_datasets(tmp_path):
    from fastvis.train import Trainer

    train = SyntheticDataset(40, num_classes=10, size=12, seed=0)
    val = SyntheticDataset(10, num_classes=10, size=12, seed=1)
    threads = torch.get_num_threads()
    try:
        t = Trainer(_api_config(tmp_path, opt="sgd"), model=_small_cnn(), train_dataset=train, val_dataset=val,
                    progress=False)
        s = t.fit()
    finally:
        torch.set_num_threads(threads)
    assert t.config.img_size == 12 and t.config.num_classes == 10 and t.config.model == "custom:Sequential"
    assert s["steps"] == 2 and s["val_images"] == 10 and math.isfinite(s["val_loss"])


def test_trainer_bf16_autocast_with_a_pytorch_model(tmp_path):
    from fastvis.train import Trainer

    threads = torch.get_num_threads()
    try:
        t = Trainer(_api_config(tmp_path, amp="bf16"), model=_small_cnn(), progress=False)
        seen = []
        t.model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        s = t.fit()
    finally:
        torch.set_num_threads(threads)
    assert torch.bfloat16 in seen          # the forward ran under autocast
    assert s["steps"] == 2 and math.isfinite(s["val_loss"])
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


def test_trainer_bf16_autocast_with_fastvis_convnext(tmp_path):
    """The fastvis ConvNeXt trains under bf16 autocast: every fastvis op follows PyTorch's
    autocast rules (dwconv and the fused block in bf16, LayerNorm/GRN in the input's
    precision)."""
    from fastvis.train import Trainer

    cfg = _api_config(tmp_path, amp="bf16", model_kwargs={"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)})
    threads = torch.get_num_threads()
    try:
        s = Trainer(cfg, progress=False).fit()
        assert s["steps"] == 2 and math.isfinite(s["val_loss"])
    finally:
        torch.set_num_threads(threads)


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from fastvis.train.report import plot_metrics

    recs = [{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "val", "step": 1, "val_loss": 1.5, "val_top1": 50.0,
                                                         "val_top5": 90.0}]
    assert plot_metrics(recs, str(tmp_path / "p.png")) is None
    assert (tmp_path / "p.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    msg = plot_metrics(recs, str(tmp_path / "q.png"))
    assert "matplotlib is not installed" in msg and not (tmp_path / "q.png").exists()
