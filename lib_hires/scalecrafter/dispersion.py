"""Convolution dispersion: a small kernel turned into a larger one with a wider receptive field.

ScaleCrafter's closed-form least squares, solved here with torch in float64. ``vec`` is row-major.
For every basis input patch ``x = e_j`` (``n x n``, ``n = input_size``):

* structure-level calibration: ``conv(U(x), K) ~ U(conv(x, k))``, with ``U`` the corner-aligned bilinear
  up-sampling by ``scale`` (``n -> scale*(n-1)+1``): the large kernel on an up-sampled map should act
  like the small kernel on the original map, up-sampled;
* pixel-level calibration, weighted by ``eta``: ``conv(x, K) ~ conv(x, k)`` on the original map.

Both are linear in the kernels, ``C vec(K) = D vec(k)`` and ``P vec(K) = Q vec(k)``, so
``R = (C'C + eta^2 P'P)^-1 (C'D + eta^2 P'Q)`` and ``vec(K) = R vec(k)``. (The official MATLAB solver scales
the pixel rows by ``eta``; "R20to1" in its file name is ``1/eta``.)

``dispersed_conv2d`` runs a conv with the dispersed kernels without ever forming them: a depthwise conv
with the columns of ``R`` followed by a 1x1 conv with the small kernels (exact, no kernel memory).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _bilinear_corner_aligned(n: int, scale: int) -> torch.Tensor:
    """1-D matrix of ``interpolate(..., align_corners=True)`` from n to scale*(n-1)+1 samples."""
    m = scale * (n - 1) + 1
    u = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        pos = i / scale
        lo = min(int(pos), n - 1)
        frac = pos - lo
        u[i, lo] += 1.0 - frac
        if frac > 0:
            u[i, lo + 1] += frac
    return u


def _correlation_matrix(image: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Rows map vec(kernel) to vec(same-size zero-padded cross-correlation of ``image``)."""
    pad = (kernel_size - 1) // 2
    h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    rows = [padded[a:a + kernel_size, b:b + kernel_size].reshape(-1) for a in range(h) for b in range(w)]
    return torch.stack(rows)


@functools.lru_cache(maxsize=None)
def _transform(small: int, large: int, scale: int, eta: float, input_size: int) -> torch.Tensor:
    n = input_size
    u1 = _bilinear_corner_aligned(n, scale)
    up = torch.kron(u1, u1)  # vec(n x n) -> vec(m x m), row-major
    c_rows, d_rows, p_rows, q_rows = [], [], [], []
    for j in range(n * n):
        basis = torch.zeros(n * n, dtype=torch.float64)
        basis[j] = 1.0
        basis = basis.view(n, n)
        small_on_x = _correlation_matrix(basis, small)                    # vec(k) -> conv(x, k)
        c_rows.append(_correlation_matrix((up @ basis.reshape(-1)).view(u1.shape[0], -1), large))
        d_rows.append(up @ small_on_x)
        p_rows.append(_correlation_matrix(basis, large))
        q_rows.append(small_on_x)
    c, d, p, q = (torch.cat(rows) for rows in (c_rows, d_rows, p_rows, q_rows))
    lhs = c.T @ c + eta ** 2 * (p.T @ p)
    rhs = c.T @ d + eta ** 2 * (p.T @ q)
    return torch.linalg.solve(lhs, rhs)


def dispersion_transform(small: int = 3, large: int = 5, scale: int = 2, eta: float = 0.05,
                         *, input_size: int | None = None) -> torch.Tensor:
    """R (float64, ``large**2 x small**2``) with ``vec(K_large) = R @ vec(k_small)``, row-major."""
    for name, value, low in (("small", small, 1), ("large", large, 1), ("scale", scale, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if small % 2 == 0 or large % 2 == 0 or large <= small:
        raise ValueError(f"small and large must be odd with large > small; got {small} and {large}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0; got {eta!r}")
    return _transform(small, large, scale, float(eta), input_size or small).clone()


def disperse_weight(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """(out, in, k, k) kernels -> (out, in, K, K) with ``vec(K) = R vec(k)`` per kernel."""
    large = int(round(transform.shape[0] ** 0.5))
    compute = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    r = transform.to(device=weight.device, dtype=compute)
    out = weight.flatten(2).to(compute) @ r.T
    return out.unflatten(2, (large, large)).to(weight.dtype)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes convs and matmuls in on ``device_type``, or None where it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
        if not enabled:
            return None
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    return torch.get_autocast_dtype(device_type) if enabled else None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a vanilla ``conv2d(x, weight)`` computes in here: autocast's where autocast is on for ``x``'s
    device (it casts a float8-stored weight, as the WebUI's fp8 storage relies on), else ``x``'s own.

    Autocast only casts the inputs of out-of-place ops, so a path made of several ops (an in-place
    accumulation, a resize, a product with a weight-derived tensor) casts its operands to this dtype itself.
    """
    autocast = _autocast_dtype(x.device.type)
    if autocast is None or x.dtype == torch.float64:  # autocast leaves float64 alone
        return x.dtype
    return autocast


def dispersed_conv2d(x: torch.Tensor, weight3: torch.Tensor, bias: torch.Tensor | None, transform: torch.Tensor, *,
                     stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``conv2d(x, disperse_weight(weight3, transform), bias, stride, padding, dilation)``, never forming that kernel.

    With ``vec(K) = R vec(k)`` per kernel, ``R`` being ``L*L x k*k``, the conv splits exactly into

    * ``spread``: a depthwise conv of ``x`` with the ``k*k`` columns of ``R`` as ``L x L`` kernels
      (``groups`` = input channels; input channel ``i`` goes to channels ``i*k*k + n``, ``n`` the row-major
      tap), with the conv's stride, padding and dilation; then
    * a 1x1 conv of ``spread`` with ``weight3`` reshaped to ``(out, in*k*k, 1, 1)``, plus ``bias``,

    since ``sum_p K[o,i,p] x_i[p] = sum_n k[o,i,n] sum_p R[p,n] x_i[p]``. Input channels go in chunks of
    ``max(1, max(in, out) // (k*k))``, so ``spread`` stays about the size of the larger of input and output.
    The 1x1 conv is a batched matrix product with a strided view of ``weight3`` accumulated in place into the
    output: no weight copy, no output-sized temporary (as a 1x1 conv op would need both, and on CPUs its
    weight reordering costs more than the product at small maps). ``weight3`` is used as handed over
    (LoRA-merged, cast); nothing is kept. Only ``groups=1`` convs are supported. The output is contiguous.
    """
    if groups != 1:
        raise ValueError(f"dispersed_conv2d: only groups=1 convs can be dispersed; got groups={groups}")
    if weight3.dim() != 4 or x.dim() != 4 or weight3.shape[1] != x.shape[1]:
        raise ValueError(f"dispersed_conv2d: weight {tuple(weight3.shape)} does not fit input {tuple(x.shape)} "
                         f"(need (out, in, k, k) with in = input channels)")
    out_channels, in_channels, kh, kw = weight3.shape
    taps = kh * kw
    large = math.isqrt(transform.shape[0])
    if transform.dim() != 2 or transform.shape[1] != taps or large * large != transform.shape[0]:
        raise ValueError(f"dispersed_conv2d: transform {tuple(transform.shape)} does not map {kh}x{kw} kernels "
                         f"to square ones")
    dtype = compute_dtype(x)
    x, weight3 = x.to(dtype), weight3.to(dtype)  # no-ops unless autocast is on or the weight is stored as fp8
    bias = None if bias is None else bias.to(dtype)
    batch = x.shape[0]
    basis = transform.to(device=x.device, dtype=dtype).T.reshape(taps, 1, large, large)
    chunk = min(in_channels, max(1, max(in_channels, out_channels) // taps))
    depthwise = basis.repeat(chunk, 1, 1, 1)
    mix = weight3.reshape(out_channels, in_channels * taps)  # column i*taps + n: input channel i, tap n
    out = None
    for start in range(0, in_channels, chunk):
        width = min(chunk, in_channels - start)
        spread = F.conv2d(x[:, start:start + width], depthwise[:width * taps], None, stride, padding, dilation, width)
        size = spread.shape[-2:]
        spread = spread.reshape(batch, width * taps, size[0] * size[1])
        part = mix[:, start * taps:(start + width) * taps].expand(batch, -1, -1)
        if out is None:
            out = torch.bmm(part, spread) if bias is None else torch.baddbmm(bias.view(1, -1, 1), part, spread)
        else:
            out.baddbmm_(part, spread)
        del spread
    return out.view(batch, out_channels, *size)
