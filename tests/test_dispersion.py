import pytest
import torch
import torch.nn.functional as F

from lib_hires.scalecrafter import disperse_weight, dispersion_transform
from lib_hires.scalecrafter.dispersion import DispersedKernelCache

# R20to1_new as published (rows: 5x5 positions row-major; columns: 3x3 taps row-major; 6 decimals).
PUBLISHED = """
 0.648790 -0.002858 -0.026280 -0.002858  0 -0.000302 -0.026280 -0.000302  0.001407
 0.275788  0.006073  0.061662  0.003648  0  0.000862 -0.013887  0.000658 -0.003331
-0.107225  0.795764 -0.107225 -0.001754  0 -0.001754  0.005764 -0.035173  0.005764
 0.061662  0.006073  0.275788  0.000862  0  0.003648 -0.003331  0.000658 -0.013887
-0.026280 -0.002858  0.648790 -0.000302  0 -0.002858  0.001407 -0.000302 -0.026280
 0.275788  0.003648 -0.013887  0.006073  0  0.000658  0.061662  0.000862 -0.003331
 0.132799 -0.007764  0.032346 -0.007764  0 -0.001859  0.032346 -0.001859  0.007849
-0.054891  0.360477 -0.054891  0.003753  0  0.003753 -0.013492  0.082682 -0.013492
 0.032346 -0.007764  0.132799 -0.001859  0 -0.007764  0.007849 -0.001859  0.032346
-0.013887  0.003648  0.275788  0.000658  0  0.006073 -0.003331  0.000862  0.061662
-0.107225 -0.001754  0.005764  0.795764  0 -0.035173 -0.107225 -0.001754  0.005764
-0.054891  0.003753 -0.013492  0.360477  0  0.082682 -0.054891  0.003753 -0.013492
 0.022974 -0.143315  0.022974 -0.143315  1 -0.143315  0.022974 -0.143315  0.022974
-0.013492  0.003753 -0.054891  0.082682  0  0.360477 -0.013492  0.003753 -0.054891
 0.005764 -0.001754 -0.107225 -0.035173  0  0.795764  0.005764 -0.001754 -0.107225
 0.061662  0.000862 -0.003331  0.006073  0  0.000658  0.275788  0.003648 -0.013887
 0.032346 -0.001859  0.007849 -0.007764  0 -0.001859  0.132799 -0.007764  0.032346
-0.013492  0.082682 -0.013492  0.003753  0  0.003753 -0.054891  0.360477 -0.054891
 0.007849 -0.001859  0.032346 -0.001859  0 -0.007764  0.032346 -0.007764  0.132799
-0.003331  0.000862  0.061662  0.000658  0  0.006073 -0.013887  0.003648  0.275788
-0.026280 -0.000302  0.001407 -0.002858  0 -0.000302  0.648790 -0.002858 -0.026280
-0.013887  0.000658 -0.003331  0.003648  0  0.000862  0.275788  0.006073  0.061662
 0.005764 -0.035173  0.005764 -0.001754  0 -0.001754 -0.107225  0.795764 -0.107225
-0.003331  0.000658 -0.013887  0.000862  0  0.003648  0.061662  0.006073  0.275788
 0.001407 -0.000302 -0.026280 -0.000302  0 -0.002858 -0.026280 -0.002858  0.648790
"""


def published():
    return torch.tensor([[float(v) for v in line.split()] for line in PUBLISHED.strip().splitlines()],
                        dtype=torch.float64)


def test_transform_shape_and_dtype():
    r = dispersion_transform()
    assert r.shape == (25, 9) and r.dtype == torch.float64


def test_matches_the_published_matrix():
    assert torch.allclose(dispersion_transform(), published(), rtol=0, atol=1e-6)


def test_centre_tap_maps_exactly_to_the_centre():
    centre = dispersion_transform()[:, 4]
    expected = torch.zeros(25, dtype=torch.float64)
    expected[12] = 1.0
    assert torch.allclose(centre, expected, rtol=0, atol=1e-12)


def test_all_ones_kernel_sums_to_9_75():
    assert dispersion_transform().sum().item() == pytest.approx(9.7523, abs=1e-4)


def calibration_loss(k5, k3, eta=0.05):
    """The published objective, written with real conv / interpolate calls over every basis patch."""
    up = lambda t: F.interpolate(t, size=(5, 5), mode="bilinear", align_corners=True)
    loss = 0.0
    for j in range(9):
        x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
        x.view(-1)[j] = 1.0
        loss = loss + (F.conv2d(up(x), k5, padding=2) - up(F.conv2d(x, k3, padding=1))).pow(2).sum()
        loss = loss + eta ** 2 * (F.conv2d(x, k5, padding=2) - F.conv2d(x, k3, padding=1)).pow(2).sum()
    return loss


def test_dispersed_kernel_minimises_the_calibration_objective():
    torch.manual_seed(0)
    k3 = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    k5 = disperse_weight(k3, dispersion_transform()).requires_grad_(True)
    with torch.enable_grad():
        loss = calibration_loss(k5, k3)
        (grad,) = torch.autograd.grad(loss, k5)
    assert grad.abs().max() < 1e-10  # stationary point of a convex quadratic: the least-squares solution
    dilated = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    dilated[..., ::2, ::2] = k3  # plain dilation by 2, the kernel dispersion improves on
    assert calibration_loss(k5.detach(), k3) < calibration_loss(dilated, k3)


def test_eta_zero_and_other_sizes_are_valid_and_bad_ones_are_refused():
    assert dispersion_transform(eta=0.0).shape == (25, 9)
    assert dispersion_transform(3, 7, 3).shape == (49, 9)
    with pytest.raises(ValueError, match="odd with large > small"):
        dispersion_transform(3, 4)
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        dispersion_transform(scale=0)


def test_transform_is_not_shared_mutable_state():
    r = dispersion_transform()
    r.zero_()
    assert dispersion_transform().abs().sum() > 0


def test_disperse_weight_is_r_per_kernel_in_every_dtype():
    r = dispersion_transform()
    w = torch.randn(4, 3, 3, 3)
    k5 = disperse_weight(w, r)
    expected = torch.einsum("pk,oik->oip", r.float(), w.flatten(2)).view(4, 3, 5, 5)
    assert torch.allclose(k5, expected, atol=1e-6)
    half = disperse_weight(w.half(), r)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), expected, atol=2e-3)


def test_cache_keys_on_identity_version_and_storage():
    cache = DispersedKernelCache(dispersion_transform())
    owner = object()
    w = torch.randn(2, 2, 3, 3)
    first = cache.kernel(owner, w)
    assert cache.kernel(owner, w) is first
    assert cache.kernel(owner, w.clone()) is not first  # equal values, another tensor (e.g. a cast copy)
    w2 = torch.randn(2, 2, 3, 3)
    k = cache.kernel(owner, w2)
    w2.add_(1.0)
    assert cache.kernel(owner, w2) is not k
    assert torch.allclose(cache.kernel(owner, w2), disperse_weight(w2, dispersion_transform()))
    with torch.inference_mode():
        frozen = torch.randn(2, 2, 3, 3)
    cache.kernel(owner, frozen)
    assert cache.cached_bytes == 0  # tensors without a version counter are never cached
