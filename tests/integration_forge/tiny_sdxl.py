"""A tiny SDXL UNet built from Forge's own ``backend/nn/unet.py`` (no checkpoint), for in-process tests.

An SDXL checkpoint Forge would load is over 1.5 GB (full-size CLIP-L, OpenCLIP-bigG and VAE), so SDXL
tests build ``IntegratedUNet2DConditionModel`` directly: the SDXL topology (3 levels, attention on levels 1
and 2, linear projections, the ADM ``label_emb``) at 32 channels, created inside Forge's
``using_forge_operations`` as its loader does, so every conv is a ``ForgeOperations.Conv2d`` (and with
``manual_cast=True`` stores its weights in another dtype than it computes in: the manual-cast branch).

Forge's backend is imported only when a test asks for the fixture: ``FORGE_DIR`` goes on ``sys.path`` and
``backend.args`` parses a fixed ``--always-cpu`` command line instead of pytest's.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

# huggingface_guess's SDXL unet_config with every width and depth cut down; the lists keep SDXL's shape
# (per input ResBlock, per output ResBlock) so the module tree is SDXL's.
TINY_SDXL_CONFIG = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=32, num_head_channels=8, num_heads=-1, use_linear_in_transformer=True,
    adm_in_channels=16, num_classes="sequential", use_spatial_transformer=True, use_checkpoint=False,
)
ADM_CHANNELS = TINY_SDXL_CONFIG["adm_in_channels"]
CONTEXT_DIM = TINY_SDXL_CONFIG["context_dim"]


def import_forge_backend(forge_dir: str | os.PathLike):
    """Forge's ``backend`` package, imported into this process (once) as Forge would on a CPU."""
    if "backend.nn.unet" in sys.modules:
        return sys.modules["backend"]
    root = str(Path(forge_dir).resolve())
    # After this checkout's paths, so Forge's modules never shadow the project's; packages_3rdparty holds the
    # gguf package Forge's operations import (modules_forge/initialization.py adds it the same way).
    for path in (root, str(Path(root) / "packages_3rdparty")):
        if path not in sys.path:
            sys.path.append(path)
    # Forge's modules.shared_cmd_options parses sys.argv strictly when imported (by a test that imports Forge's
    # ``modules``): pytest's arguments would end the run there. This makes it parse leniently.
    os.environ.setdefault("IGNORE_CMD_ARGS_ERRORS", "1")
    saved = sys.argv
    sys.argv = [str(Path(root) / "launch.py"), "--always-cpu", "--disable-gpu-warning"]
    try:
        importlib.import_module("backend.args")
        importlib.import_module("backend.memory_management")
        importlib.import_module("backend.operations")
        importlib.import_module("backend.nn.unet")
    finally:
        sys.argv = saved
    return sys.modules["backend"]


def tiny_sdxl_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for the tiny SDXL UNet, keyed as in a checkpoint's ``model.diffusion_model.*`` (less the
    prefix): drawn on a plain-torch build of Forge's class (its layers outside ``using_forge_operations``)."""
    from backend.nn.unet import IntegratedUNet2DConditionModel

    from tools.unet_factory import randomize_

    plain = IntegratedUNet2DConditionModel.from_config(dict(TINY_SDXL_CONFIG))
    with torch.no_grad():
        randomize_(plain, seed)
    return plain.state_dict()


def build_tiny_sdxl_unet(*, seed: int = 0, storage_dtype=torch.float32, computation_dtype=torch.float32):
    """A random-weight ``IntegratedUNet2DConditionModel`` made as Forge's loader makes a checkpoint's UNet: built
    inside ``using_forge_operations`` (ForgeOperations layers, ``manual_cast`` where ``storage_dtype !=
    computation_dtype``, as ``--unet-in-bf16`` on a CPU), moved to the storage dtype, then the state dict loaded
    (ForgeOperations.Linear creates its weights only from a state dict)."""
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    state = tiny_sdxl_state_dict(seed)
    to_args = dict(device=torch.device("cpu"), dtype=storage_dtype)
    with using_forge_operations(**to_args, manual_cast_enabled=storage_dtype != computation_dtype):
        model = IntegratedUNet2DConditionModel.from_config(dict(TINY_SDXL_CONFIG)).to(**to_args)
    load_state_dict(model, state)
    model.storage_dtype, model.computation_dtype = storage_dtype, computation_dtype
    return model.eval().requires_grad_(False)


def example_inputs(batch: int = 2, latent_hw: tuple[int, int] = (16, 16), *, tokens: int = 7, seed: int = 0,
                   dtype=torch.float32) -> dict:
    """Keyword arguments for ``IntegratedUNet2DConditionModel.forward``: x, timesteps, context, y."""
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, *latent_hw, generator=gen, dtype=dtype),
                timesteps=torch.linspace(900, 100, batch, dtype=dtype),
                context=torch.randn(batch, tokens, CONTEXT_DIM, generator=gen, dtype=dtype),
                y=torch.randn(batch, ADM_CHANNELS, generator=gen, dtype=dtype))


@pytest.fixture(scope="session")
def forge_backend():
    """Forge's ``backend`` package in this process; skips where this interpreter cannot import it."""
    forge_dir = os.environ.get("FORGE_DIR")
    if not forge_dir:
        pytest.skip("FORGE_DIR is not set")
    try:
        return import_forge_backend(forge_dir)
    except ImportError as error:
        pytest.skip(f"Forge's backend does not import with {sys.executable} ({error}): run the Forge tests with "
                    f"Forge's venv ({forge_dir}/venv/bin/python)")


@pytest.fixture
def sdxl_unet(forge_backend):
    """``build(seed=0, storage_dtype=..., computation_dtype=...)`` -> a fresh tiny SDXL UNet; ``.inputs(...)``
    gives matching forward arguments."""
    build_tiny_sdxl_unet.inputs = example_inputs
    return build_tiny_sdxl_unet
