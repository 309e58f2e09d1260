"""Regression fingerprints of the default paths: changes that are not meant to alter images keep these outputs.

Each case runs a default path on the tiny random UNets (ScaleCrafter through k-diffusion's Euler and DPM++ 2M with
noise-damped CFG, dispersion, a DemoFusion stage driven the way the WebUI adapter drives it, the tiled decode) and
compares the output with ``tests/regression/<case>.npy``:

* bit for bit on a machine that has recorded its own digest of the same output: same torch, same CPU (model,
  stepping, flags, caches) and the same number of threads, the things that decide which kernels run and in which
  order they sum (``machine()``);
* everywhere else to 1e-5 relative to the ``.npy`` (another CPU or thread count sums in another order), so a real
  change still fails while a different machine does not. ``REGRESSION_EXACT=1`` demands bit-identity (and fails
  where this machine has no digest), ``=0`` never.

To re-record after a change that *means* to alter an output, run
``REGRESSION_RECORD=1 .venv/bin/python -m pytest tests/test_regression.py`` and say why in the commit. To add this
machine's digests of today's outputs without touching the references (they must pass by tolerance first), run it
with ``REGRESSION_RECORD=machine``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lib_hires.demofusion import DemoFusionSettings, Stage
from lib_hires.scalecrafter import NoiseDampedCFG, ScaleCrafterController, ScaleCrafterSettings, build_plan
from lib_hires.vae import tiled_decode
from tests.conftest import ldm
from tools.vae_factory import build_decoder

HERE = Path(__file__).resolve().parent / "regression"
INDEX = HERE / "index.json"
RECORD = os.environ.get("REGRESSION_RECORD") == "1"
RECORD_MACHINE = os.environ.get("REGRESSION_RECORD") == "machine"


def _cpu_identity() -> str:
    """What /proc/cpuinfo says decides kernel choice; other systems fall back to platform's description."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    first = text.split("\n\n", 1)[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    keys = ("vendor_id", "model name", "cpu family", "model", "stepping", "cache size", "flags", "Features",
            "CPU implementer", "CPU part")
    described = ";".join(f"{k.strip()}={fields[k].strip()}" for k in fields if k.strip() in keys)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def machine() -> str:
    return (f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()} {_cpu_identity()}, "
            f"{torch.get_num_threads()} threads")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _exact_digest(entry: dict) -> str | None:
    """The digest this machine must reproduce bit for bit, or None where only the tolerance applies."""
    here = entry.get("exact", {}).get(machine())
    forced = os.environ.get("REGRESSION_EXACT")
    if forced == "0":
        return None
    if forced == "1":
        assert here is not None, f"REGRESSION_EXACT=1 but no digest for {machine()}: see this module's docstring"
    return here


def compare(name: str, array: np.ndarray, expected: np.ndarray, exact_digest: str | None) -> None:
    if exact_digest is not None:
        assert _digest(array) == exact_digest, f"{name} is no longer bit-identical to its reference"
    np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()),
                               err_msg=f"{name} moved beyond the tolerance of another machine's rounding")


def check(name: str, out: torch.Tensor) -> None:
    array = out.detach().to(torch.float32).cpu().numpy()
    index = json.loads(INDEX.read_text()) if INDEX.exists() else {}
    if RECORD:
        HERE.mkdir(exist_ok=True)
        np.save(HERE / f"{name}.npy", array)
        index[name] = {"sha256": _digest(array), "recorded_on": machine(), "exact": {machine(): _digest(array)}}
        INDEX.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        return
    assert name in index, f"no reference for {name}: record it (see this module's docstring)"
    entry = index[name]
    expected = np.load(HERE / f"{name}.npy")
    assert _digest(expected) == entry["sha256"], f"tests/regression/{name}.npy does not match its recorded hash"
    compare(name, array, expected, _exact_digest(entry))
    if RECORD_MACHINE:
        entry.setdefault("exact", {})[machine()] = _digest(array)
        INDEX.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def test_a_real_change_fails_on_every_machine_and_rounding_passes_elsewhere():
    expected = np.load(HERE / "tiled-decode.npy")
    rounding = expected * (1 + 1e-7 * np.sign(expected))
    compare("tiled-decode", rounding, expected, None)
    with pytest.raises(AssertionError, match="bit-identical"):
        compare("tiled-decode", rounding, expected, _digest(expected))
    changed = expected.copy()
    changed.flat[changed.size // 2] += 1e-3 * float(np.abs(expected).max())
    with pytest.raises(AssertionError, match="tolerance"):
        compare("tiled-decode", changed, expected, None)


def _denoiser(k_diffusion, family):
    return k_diffusion.external.CompVisDenoiser(ldm(family))


def _conds(family, gen):
    if family == "sdxl":
        unet = ldm(family).model.diffusion_model

        def one():
            return {"crossattn": torch.randn(1, 7, unet.config.context_dim, generator=gen),
                    "vector": torch.randn(1, unet.config.adm_in_channels, generator=gen)}
    else:
        def one():
            return torch.randn(1, 7, 32, generator=gen)
    return one(), one()


@pytest.mark.parametrize("family,sampler,dispersion", [
    ("sd1", "sample_euler", False),
    ("sd1", "sample_dpmpp_2m", False),
    ("sd1", "sample_euler", True),
    ("sdxl", "sample_dpmpp_2m", False),
])
def test_scalecrafter_default_path(k_diffusion, family, sampler, dispersion):
    kd = k_diffusion.sampling
    denoiser = _denoiser(k_diffusion, family)
    unet = denoiser.inner_model.model.diffusion_model
    size = 128 if family == "sd1" else 256
    plan = build_plan(family, size, size, ScaleCrafterSettings(enabled=True, dispersion=dispersion),
                      train_size=size // 2)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, size // 8, size // 8, generator=gen)
    cond, uncond = _conds(family, gen)
    sigmas = kd.get_sigmas_karras(5, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    with ScaleCrafterController(unet, plan) as controller:
        guided = NoiseDampedCFG(denoiser, controller, sigma_to_t=denoiser.sigma_to_t)
        out = getattr(kd, sampler)(guided, x * sigmas[0], sigmas,
                                   extra_args={"cond": cond, "uncond": uncond, "cond_scale": 7.0}, disable=True)
    check(f"scalecrafter-{family}-{sampler}{'-dispersion' if dispersion else ''}", out)


class _CFG(torch.nn.Module):
    """The WebUI's CFGDenoiser layering around a k-diffusion inner model: cond rows, then uncond rows."""

    def __init__(self, inner):
        super().__init__()
        self.inner_model = inner

    def forward(self, x, sigma, cond=None, uncond=None, cond_scale=7.0):
        out = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        positive, negative = out.chunk(2)
        return negative + (positive - negative) * cond_scale


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_dpmpp_2m"])
def test_demofusion_stage_through_the_webui_patches(k_diffusion, sampler):
    from lib_hires.webui.demofusion_sampler import StageSampling

    kd = k_diffusion.sampling
    cfg = _CFG(_denoiser(k_diffusion, "sd1"))
    sampler_object = SimpleNamespace(model_wrap_cfg=cfg, callback_state=lambda d: None, func=getattr(kd, sampler))
    gen = torch.Generator().manual_seed(5)
    z_up, noise = torch.randn(2, 1, 4, 32, 32, generator=gen).unbind(0)
    cond, uncond = _conds("sd1", gen)
    patches = StageSampling(SimpleNamespace(sampler=sampler_object), Stage(2, 2.0, 256, 256, 2),
                            DemoFusionSettings(window=16, stride=8), z_up, noise,
                            torch.Generator().manual_seed(9), None, None, lambda: None)
    inner = cfg.inner_model.inner_model
    sigmas = kd.get_sigmas_karras(4, 0.0292, 14.6146)
    try:
        out = sampler_object.func(cfg, z_up + sigmas[0] * noise, sigmas,
                                   extra_args={"cond": cond, "uncond": uncond, "cond_scale": 7.0},
                                   callback=lambda d: sampler_object.callback_state(d), disable=True)
    finally:
        patches.remove()
    assert inner is cfg.inner_model.inner_model
    check(f"demofusion-stage-{sampler}", out)


def test_tiled_decode_default_path():
    decoder = build_decoder(0.125, seed=3)
    gen = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 4, 24, 40, generator=gen)
    check("tiled-decode", tiled_decode(decoder, latent, tile=16, overlap=4))


def test_demofusion_whole_run_through_sample_stages(k_diffusion):
    """Three stages (x1, x2, x3) of the engine's own loop: upsample, skip residual, fused views, anchor."""
    from lib_hires.demofusion import DemoFusionSettings, plan_stages, sample_stages

    denoiser = _denoiser(k_diffusion, "sd1")
    plan = plan_stages(64, 64, 3, window=8)
    gen = torch.Generator().manual_seed(21)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    cond, _ = _conds("sd1", gen)
    sigmas = denoiser.get_sigmas(4)
    results = sample_stages(denoiser, plan.stages, sigmas, noise, settings=DemoFusionSettings(window=8, stride=4),
                            sigma_to_t=denoiser.sigma_to_t, generator=torch.Generator().manual_seed(22),
                            jitter_generator=torch.Generator().manual_seed(23), extra_args={"cond": cond})
    assert [tuple(z.shape[-2:]) for z in results] == [(8, 8), (16, 16), (24, 24)]
    check("demofusion-sample-stages-x3", results[-1])
