"""Re-dilated and dispersed convs compute in the dtype the vanilla conv would: autocast's, else the input's.

The WebUI's ``fp8_storage`` keeps Conv2d/Linear weights as float8_e4m3fn and computes under
``devices.autocast()``, which on a CPU is ``torch.autocast("cpu", dtype=torch.bfloat16)``
(``modules/devices.py``); fp16 models compute with half weights and inputs (``--upcast-sampling`` casts the
input to the UNet's dtype), ``--no-half`` in float32. Float32 without autocast stays bit-identical
(``tests/test_regression.py``).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_hires.scalecrafter import ScaleCrafterController, ScaleCrafterSettings, build_plan, disperse_weight, dispersion_transform
from lib_hires.scalecrafter.redilated_conv import redilated_conv2d
from tests.conftest import tiny_unet
from tools.unet_factory import example_inputs

R = dispersion_transform()
FP8 = getattr(torch, "float8_e4m3fn", None)
needs_fp8 = pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# (weight storage dtype, input dtype, context, dtype the vanilla conv computes in)
CONFIGS = {
    "fp8 storage": (FP8, torch.float32, bf16_autocast, torch.bfloat16),
    "bf16 autocast, fp32 weights": (torch.float32, torch.float32, bf16_autocast, torch.bfloat16),
    "bf16 weights": (torch.bfloat16, torch.bfloat16, contextlib.nullcontext, torch.bfloat16),
    "fp16 weights (upcast sampling casts the input)": (torch.float16, torch.float16, contextlib.nullcontext,
                                                        torch.float16),
}


def reference(x, w, b, factor, dtype, *, dispersed, stride=1):
    """The same re-dilated conv written out with the formed kernel, every tensor in ``dtype``, no autocast."""
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    if dispersed:
        w = disperse_weight(w, R)  # the 5x5 kernel at the given factor (the hook is what halves it)
    d = max(1, int(-(-factor // 1)))
    h, wd = x.shape[-2:]
    out = ((h - 1) // stride + 1, (wd - 1) // stride + 1)
    if d != factor:
        x = F.interpolate(x, size=(round(h * d / factor), round(wd * d / factor)), mode="bilinear",
                          align_corners=False)
    y = F.conv2d(x, w, b, stride, d * (w.shape[-1] - 1) // 2, d)
    if tuple(y.shape[-2:]) != out:
        y = F.interpolate(y, size=out, mode="bilinear", align_corners=False)
    return y


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dispersed", [False, True])
@pytest.mark.parametrize("factor,stride", [(2.0, 1), (3.0, 1), (2.5, 2), (4.0, 1)])
def test_redilated_and_dispersed_convs_follow_the_compute_dtype(config, dispersed, factor, stride):
    storage, input_dtype, context, compute = CONFIGS[config]
    if storage is None:
        pytest.skip("this torch has no float8_e4m3fn")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 17, 20, generator=gen)
    w, b = torch.randn(7, 12, 3, 3, generator=gen) / 6, torch.randn(7, generator=gen) / 4
    w_stored, b_stored = w.to(storage), b.to(storage)
    with context():
        vanilla = F.conv2d(x.to(input_dtype), w_stored, b_stored, stride, 1)
        got = redilated_conv2d(x.to(input_dtype), w_stored, b_stored, factor, stride=(stride, stride),
                               transform=R if dispersed else None)
    assert vanilla.dtype == compute and got.dtype == compute and got.shape == vanilla.shape
    # What the stored values give in exact arithmetic, and the same conv written out in the compute dtype:
    # the hooked conv must be as close to the truth as that reference (a couple of roundings either way).
    truth = reference(x.to(input_dtype), w_stored.to(torch.float64), b_stored.to(torch.float64), factor,
                      torch.float64, dispersed=dispersed, stride=stride)
    same_dtype = reference(x.to(input_dtype), w_stored, b_stored, factor, compute, dispersed=dispersed, stride=stride)
    scale = truth.abs().max().item()
    ulp = torch.finfo(compute).eps
    reference_error = (same_dtype.double() - truth).abs().max().item() / scale
    error = (got.double() - truth).abs().max().item() / scale
    assert error <= max(3 * reference_error, 8 * ulp), (error, reference_error)


def _fp8_storage_(model: nn.Module) -> nn.Module:
    """What ``sd_models.load_model_weights`` does for ``fp8_storage``: every Conv2d/Linear to float8_e4m3fn."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.to(FP8)
    return model


def _bf16_values_(model: nn.Module) -> nn.Module:
    """The same weights as ``_fp8_storage_`` gives, held in bfloat16 (float8 e4m3 values are exact there)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.to(FP8).to(torch.bfloat16)
    return model


@needs_fp8
def test_a_dispersed_plan_runs_on_a_unet_with_fp8_storage_under_cpu_autocast():
    """The configuration of the bug report: ``fp8_storage: Enable`` + dispersion used to raise
    ``RuntimeError: Input dtypes must be the same ... Float8_e4m3fn`` in the in-place accumulation."""
    base = tiny_unet("sd1")
    plan = build_plan("sd1", 256, 256, ScaleCrafterSettings(enabled=True, dispersion=True), train_size=64)
    assert plan.dispersed and plan.main
    fp8, bf16 = _fp8_storage_(copy.deepcopy(base)), _bf16_values_(copy.deepcopy(base))
    x, context, _ = example_inputs(base, 1, (32, 32))
    t = torch.tensor([901.0])
    outputs = {}
    for name, unet in (("fp8", fp8), ("bf16", bf16)):
        with bf16_autocast():
            vanilla = unet(x, t, context)
            with ScaleCrafterController(unet, plan) as controller:
                outputs[name] = unet(x, t, context)
                assert controller.last_call is not None and controller.last_call[2]
        assert torch.isfinite(outputs[name].float()).all()
        assert not torch.allclose(outputs[name].float(), vanilla.float(), atol=1e-2)  # the dilation really ran
    # The fp8-stored UNet computes exactly what the same values held in bfloat16 compute.
    assert torch.allclose(outputs["fp8"].float(), outputs["bf16"].float(), rtol=0, atol=1e-6)
