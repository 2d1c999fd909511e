"""Plain PyTorch reference of maxpool2d and its backward (the test oracle; float64 capable).

Forward: the input padded with -inf, unfolded into its windows; the argmax is the first maximum
of the window in row-major scan order over the real (unpadded) elements, or the last NaN when the
window holds one (PyTorch's own choice: its kernels replace the running maximum when
``val > max || isnan(val)``). Backward: a scatter-add of grad_out (in the accumulation dtype)
into the padded input's gradient at each output's argmax, rounded once. Launcher contract:
``resnet_kernels/ops/maxpool.py`` (ForwardCall / BackwardCall)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import acc_dtype


def _windows(t, k, s):
    """(N, C, OH, OW, kh*kw) windows of a padded (N, C, Hp, Wp) tensor (or (Hp, Wp) -> (OH, OW, K))."""
    d = t.dim()
    w = t.unfold(d - 2, k[0], s[0]).unfold(d - 1, k[1], s[1])
    return w.reshape(*w.shape[:-2], k[0] * k[1])


def maxpool2d_forward(x, out, argmax, k, s, p, layout) -> None:
    N, C, H, W = x.shape
    K = k[0] * k[1]
    xp = F.pad(x, (p[1], p[1], p[0], p[0]), value=float("-inf"))
    valid = torch.zeros((H + 2 * p[0], W + 2 * p[1]), dtype=torch.bool, device=x.device)
    valid[p[0]:p[0] + H, p[1]:p[1] + W] = True
    win = _windows(xp, k, s)  # N, C, OH, OW, K
    vwin = _windows(valid, k, s)  # OH, OW, K
    nan = win.isnan()
    m = win.amax(-1, keepdim=True)
    first_max = ((win == m) & vwin).to(torch.uint8).argmax(-1)  # argmax returns the first of equal maxima
    last_nan = (K - 1) - nan.flip(-1).to(torch.uint8).argmax(-1)
    a = torch.where(nan.any(-1), last_nan, first_max)
    out.copy_(torch.gather(win, -1, a.unsqueeze(-1)).squeeze(-1))
    if argmax is not None:
        argmax.copy_(a.to(torch.uint8))


def maxpool2d_backward(grad_out, argmax, grad_x, k, s, p, layout) -> None:
    N, C, OH, OW = grad_out.shape
    H, W = grad_x.shape[2], grad_x.shape[3]
    Hp, Wp = H + 2 * p[0], W + 2 * p[1]
    acc = acc_dtype(grad_out.dtype)
    a = argmax.long()
    row = torch.arange(OH, device=a.device).view(OH, 1) * s[0] + a.div(k[1], rounding_mode="floor")
    col = torch.arange(OW, device=a.device).view(1, OW) * s[1] + a.remainder(k[1])
    flat = (row * Wp + col).reshape(N, C, OH * OW)
    gp = torch.zeros((N, C, Hp * Wp), dtype=acc, device=grad_out.device)
    gp.scatter_add_(2, flat, grad_out.to(acc).reshape(N, C, OH * OW))
    grad_x.copy_(gp.view(N, C, Hp, Wp)[:, :, p[0]:p[0] + H, p[1]:p[1] + W])
