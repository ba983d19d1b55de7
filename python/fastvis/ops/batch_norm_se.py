"""BatchNorm (training mode) followed by squeeze-and-excitation, as one autograd function:
UniRepLKNet's ``se(norm(dwconv(x)))`` with the depthwise output as input.

The composition of ``nn.BatchNorm2d`` and the SE block (pool, 1x1 down, ReLU, 1x1 up,
sigmoid, scale) runs about a dozen passes over the activation forward and backward and
saves the BatchNorm output for the scale's backward. Here (per channel c, image n, pixel
p; M = N*H*W pixels per channel, P = H*W per image):

Forward. Per image the mean ybar and the sum of squared deviations from it, m2 (two
passes, no cancellation); the BatchNorm statistics follow exactly: mu_c = mean_n ybar,
var_c = sum_n m2 / M + mean_n (ybar - mu)^2 (the law of total variance, equal groups).
BatchNorm is the affine map z1 = a x + b, a = gamma / sqrt(var + eps), b = beta - a mu, so
SE's pooled input is m = a ybar + b without another pass, the SE MLP runs on (N, C) values,
and the output z = (a s) x + (b s) is one multiply-add pass (into the deviations' buffer).
Saved: x and (N, C)-sized values only.

Backward. With g = dL/dz, two per-(n, c) sums Sg = sum_p g and Sgx = sum_p g x give
dL/ds = a Sgx + b Sg, SE's backward on (N, C) values gives dL/dm, and BatchNorm's
backward needs only sum over n, p of dL/dz1 = s g + dL/dm / P and of that times
xhat = (x - mu) / sigma, both sums of the per-(n, c) sums. The input gradient is then
dx = (a s) g + Q x + R with per-channel Q and per-(n, c) R: two multiply-add passes.
float32 and float64; the statistics and (N, C) arithmetic in the input's dtype, as
PyTorch's BatchNorm does on the CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["batch_norm_se", "batch_norm_se_reference"]


def _col(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


class _BatchNormSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, wd, bd, wu, bu, eps: float):
        n, c, h, w = x.shape
        # Per image two passes (mean, then squared deviations from it: no cancellation);
        # torch.var_mean over (H, W) of a channels_last tensor takes 10x as long.
        # The output buffer serves as the deviations' scratch first (one fresh
        # activation-sized buffer per call, not two).
        ybar = x.sum(dim=(2, 3)) / float(h * w)                           # (N, C)
        z = torch.sub(x, _col(ybar))
        m2 = z.mul_(z).sum(dim=(2, 3))
        mu = ybar.mean(0)
        var = m2.sum(0) / float(n * h * w) + (ybar - mu).square().mean(0)
        rstd = torch.rsqrt(var + eps)
        a = gamma * rstd
        b = beta - a * mu
        m = a * ybar + b                                                  # SE's pooled input
        hid = torch.relu(F.linear(m, wd, bd))
        s = torch.sigmoid(F.linear(hid, wu, bu))
        torch.addcmul(_col(b * s), x, _col(a * s), out=z)
        ctx.save_for_backward(x, ybar, mu, rstd, a, b, m, hid, s, wd, wu)
        ctx.mark_non_differentiable(mu, var)
        return z, mu, var

    @staticmethod
    def backward(ctx, gz, _gmu, _gvar):
        x, ybar, mu, rstd, a, b, m, hid, s, wd, wu = ctx.saved_tensors
        n, c, h, w = x.shape
        P = float(h * w)
        M = float(n) * P
        sg = gz.sum(dim=(2, 3))                                           # (N, C)
        gx = torch.mul(gz, x)                     # scratch for sum g x, then the input gradient
        sgx = gx.sum(dim=(2, 3))
        ds = a * sgx + b * sg                                             # dL/ds
        du = ds * s * (1.0 - s)
        g_wu = du.t().mm(hid)
        g_bu = du.sum(0)
        dh = du.mm(wu) * (hid > 0).to(du.dtype)
        g_wd = dh.t().mm(m)
        g_bd = dh.sum(0)
        dm = dh.mm(wd)                                                    # dL/dm, (N, C)
        # dL/dz1 = s g + dm / P at each pixel; BatchNorm's two sums over (n, p):
        t1 = (s * sg + dm).sum(0)                                         # sum dL/dz1 = dL/dbeta
        t2 = rstd * (s * (sgx - mu * sg) + dm * (ybar - mu)).sum(0)       # sum dL/dz1 xhat = dL/dgamma
        if ctx.needs_input_grad[0]:
            q = -a * rstd * t2 / M                                        # (C,)
            r = a * dm / P - a * t1 / M - q * mu                          # (N, C)
            torch.addcmul(_col(r), x, q[None, :, None, None], out=gx)
            gx.addcmul_(gz, _col(a * s))
        else:
            gx = None
        return gx, t2, t1, g_wd, g_bd, g_wu, g_bu, None


def batch_norm_se(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                  weight: torch.Tensor, bias: torch.Tensor, momentum: float, eps: float,
                  se_down_weight: torch.Tensor, se_down_bias: torch.Tensor,
                  se_up_weight: torch.Tensor, se_up_bias: torch.Tensor) -> torch.Tensor:
    """``z1 * sigmoid(W_u relu(W_d mean_hw(z1) + b_d) + b_u)`` with ``z1`` the training-mode
    BatchNorm of x (batch statistics), the running statistics updated in place (momentum,
    unbiased variance) when given.

    Args:
        x: (N, C, H, W) float32 or float64, any memory format (the output keeps it).
        running_mean, running_var: (C,) or both None.
        weight, bias: BatchNorm's (C,) affine parameters.
        momentum: the running-statistics factor (the caller resolves a None momentum).
        eps: added to the variance.
        se_down_weight, se_down_bias: (R, C) and (R,); se_up_weight, se_up_bias: (C, R), (C,).
    """
    if x.dim() != 4:
        raise ValueError(f"batch_norm_se: expected a 4D (N, C, H, W) input, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"batch_norm_se: expected float32 or float64, got {x.dtype}")
    n, c, h, w = x.shape
    if n * h * w <= 1:
        raise ValueError(f"batch_norm_se: expected more than 1 value per channel when training, "
                         f"got input size {tuple(x.shape)}")
    z, mu, var = _BatchNormSE.apply(x, weight, bias, se_down_weight, se_down_bias, se_up_weight,
                                   se_up_bias, float(eps))
    if running_mean is not None:
        with torch.no_grad():
            cnt = n * h * w
            running_mean.mul_(1.0 - momentum).add_(mu.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_((var * (cnt / (cnt - 1))).to(running_var.dtype),
                                                  alpha=momentum)
    return z


def batch_norm_se_reference(x, running_mean, running_var, weight, bias, momentum, eps,
                            se_down_weight, se_down_bias, se_up_weight, se_up_bias) -> torch.Tensor:
    """The same with PyTorch's modules' ops: F.batch_norm, mean pooling, two linears."""
    z1 = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    s = torch.relu(F.linear(z1.mean(dim=(2, 3)), se_down_weight, se_down_bias))
    s = torch.sigmoid(F.linear(s, se_up_weight, se_up_bias))
    return z1 * _col(s)
