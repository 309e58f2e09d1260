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
"""
from __future__ import annotations

import functools
import weakref

import torch


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


# Recomputing a kernel costs about 9/(H*W) of running its 5x5 conv (under 1% from 32x32 maps up),
# while keeping every dispersed kernel of an SD UNet would hold 1-2 GB. So the cache has a byte budget.
DEFAULT_KERNEL_CACHE_BYTES = 128 * 2 ** 20


class DispersedKernelCache:
    """Dispersed kernels keyed by the identity, version, storage, dtype and device of the 3x3 weight.

    The weight is the one handed to ``_conv_forward`` (LoRA-merged, cast), so the key must change
    whenever its contents can: a new tensor object (a cast copy), an in-place update (``_version``) or
    a moved/reassigned storage (``data_ptr``). Identity is held through a weakref, so a freed temporary
    can never be mistaken for a new one allocated at the same address. Entries are kept first come,
    first served up to ``max_bytes``: convs run in a fixed cycle, where LRU eviction would never hit.
    """

    def __init__(self, transform: torch.Tensor, max_bytes: int = DEFAULT_KERNEL_CACHE_BYTES):
        self.transform = transform
        self.max_bytes = max_bytes
        self._entries: dict[object, tuple] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def _signature(weight: torch.Tensor):
        try:
            version = weight._version
        except RuntimeError:  # inference tensors have no version counter: never cache them
            return None
        return version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape)

    def kernel(self, owner: object, weight: torch.Tensor) -> torch.Tensor:
        signature = self._signature(weight)
        entry = self._entries.get(owner)
        if entry is not None and signature is not None:
            ref, cached_signature, kernel = entry
            if ref() is weight and cached_signature == signature:
                self.hits += 1
                return kernel
        self.misses += 1
        if entry is not None:
            self._drop(owner)
        kernel = disperse_weight(weight, self.transform)
        size = kernel.numel() * kernel.element_size()
        if signature is not None and self._bytes + size <= self.max_bytes:
            self._entries[owner] = (weakref.ref(weight), signature, kernel)
            self._bytes += size
        return kernel

    def _drop(self, owner: object) -> None:
        _, _, kernel = self._entries.pop(owner)
        self._bytes -= kernel.numel() * kernel.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes
