import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from lib_hires.scalecrafter import disperse_weight, dispersed_conv2d, dispersion_transform

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


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates (views aside) while active."""

    PRODUCTS = (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.baddbmm_)

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.convs = self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.convs += func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution)
        self.products += func.overloadpacket in self.PRODUCTS
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def reference_dispersed(x, w, b, stride, padding, dilation):
    return F.conv2d(x, disperse_weight(w, dispersion_transform()), b, stride, padding, dilation)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("channels", [(6, 6), (20, 7), (5, 31), (1, 1)])
@pytest.mark.parametrize("hw", [(16, 16), (13, 21), (9, 7)])
def test_factorised_conv_equals_the_conv_with_the_dispersed_kernel(dtype, tol, stride, dilation, channels, hw):
    torch.manual_seed(0)
    cin, cout = channels
    x = torch.randn(2, cin, *hw, dtype=dtype)
    w = torch.randn(cout, cin, 3, 3, dtype=dtype)
    b = torch.randn(cout, dtype=dtype)
    r = dispersion_transform().to(dtype)
    padding = 2 * dilation
    got = dispersed_conv2d(x, w, b, r, stride=stride, padding=padding, dilation=dilation)
    expected = reference_dispersed(x, w, b, stride, padding, dilation)
    assert got.shape == expected.shape and got.dtype == dtype
    assert ((got - expected).abs().max() / expected.abs().max()).item() < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_factorised_conv_in_half_precision_stays_within_a_few_ulps(dtype, tol):
    torch.manual_seed(4)
    x, w = torch.randn(1, 32, 16, 16), torch.randn(16, 32, 3, 3) * 0.1
    expected = reference_dispersed(x, w, None, 1, 2, 1)
    got = dispersed_conv2d(x.to(dtype), w.to(dtype), None, dispersion_transform().to(dtype), padding=2)
    assert got.dtype == dtype  # the spread is rounded to dtype too: about twice the error of a formed kernel
    assert ((got.float() - expected).abs().max() / expected.abs().max()).item() < tol


def test_factorised_conv_without_bias_and_with_tuple_arguments():
    torch.manual_seed(1)
    x, w = torch.randn(1, 4, 11, 15, dtype=torch.float64), torch.randn(3, 4, 3, 3, dtype=torch.float64)
    got = dispersed_conv2d(x, w, None, dispersion_transform(), stride=(1, 2), padding=(4, 2), dilation=(2, 1))
    assert torch.allclose(got, reference_dispersed(x, w, None, (1, 2), (4, 2), (2, 1)), rtol=0, atol=1e-10)


def test_factorised_conv_takes_channels_last_input_and_gradients():
    torch.manual_seed(5)
    x = torch.randn(3, 20, 10, 12, dtype=torch.float64).to(memory_format=torch.channels_last)
    w, b = torch.randn(5, 20, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = dispersed_conv2d(x, w, b, dispersion_transform(), padding=4, dilation=2)
    assert torch.allclose(got, reference_dispersed(x, w, b, 1, 4, 2), rtol=0, atol=1e-10)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with torch.enable_grad():
        grads = torch.autograd.grad(dispersed_conv2d(*leaves, dispersion_transform(), padding=2).square().sum(), leaves)
        expected = torch.autograd.grad(reference_dispersed(*leaves, 1, 2, 1).square().sum(), leaves)
    assert all(torch.allclose(g, e, rtol=1e-10, atol=1e-9) for g, e in zip(grads, expected))


def test_factorised_conv_works_in_input_channel_chunks():
    torch.manual_seed(2)
    x, w, b = torch.randn(1, 40, 12, 12), torch.randn(8, 40, 3, 3), torch.randn(8)  # chunk 40 // 9 = 4 channels
    with LargestTensor() as mode:
        got = dispersed_conv2d(x, w, b, dispersion_transform(), padding=2)
    assert mode.convs == 10 and mode.products == 10  # a depthwise conv and a 1x1 product per chunk
    expected = reference_dispersed(x, w, b, 1, 2, 1)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("channels, stride", [((64, 64), 1), ((128, 64), 1), ((32, 96), 1), ((64, 64), 2)])
def test_no_tensor_made_inside_is_larger_than_the_input_or_output(channels, stride):
    cin, cout = channels
    x, w, b = torch.randn(2, cin, 24, 24), torch.randn(cout, cin, 3, 3), torch.randn(cout)
    with LargestTensor() as mode:
        out = dispersed_conv2d(x, w, b, dispersion_transform(), stride=stride, padding=4, dilation=2)
    # unchunked, the spread would be 9x the input; but for (32, 96) the 5x5 kernel is also larger than this
    assert mode.largest <= max(x.numel(), out.numel())
    with LargestTensor() as precomputed:  # the mode does see a kernel being formed
        reference_dispersed(x, w, b, stride, 4, 2)
    assert precomputed.largest >= cout * cin * 25


def test_factorised_conv_refuses_what_it_cannot_compute():
    r = dispersion_transform()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="only groups=1"):
        dispersed_conv2d(x, torch.randn(4, 2, 3, 3), None, r, padding=2, groups=2)
    with pytest.raises(ValueError, match="does not fit input"):
        dispersed_conv2d(x, torch.randn(4, 3, 3, 3), None, r, padding=2)
    with pytest.raises(ValueError, match="transform"):
        dispersed_conv2d(x, torch.randn(4, 4, 5, 5), None, r, padding=2)
