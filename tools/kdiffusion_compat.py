"""Imports k-diffusion's ``sampling`` and ``external`` modules in the CPU test environment.

Only for tests and developer tools: inside the WebUI ``k_diffusion`` imports normally and the
extension never calls this. The package on the index has an ``__init__`` that imports every
submodule (augmentation -> scikit-image, evaluation -> clip, ...), and ``utils`` imports torchvision,
whose only build reachable here is CUDA-only and fails at import on a CPU machine. When (and only
when) the normal import fails, this loads the two submodules from the installed package without
running its ``__init__``, with a stand-in ``torchvision`` present just for the duration of that
import (``utils`` only uses it for PIL image helpers that sampling never calls).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass


@dataclass(frozen=True)
class KDiffusion:
    sampling: types.ModuleType
    external: types.ModuleType
    fallback_reason: str | None  # None when the package imported normally

    def describe(self) -> str:
        if self.fallback_reason is None:
            return "k-diffusion: real package import"
        return ("k-diffusion: sampling/external loaded without the package __init__ because the normal import "
                f"failed ({self.fallback_reason})")


def _stand_in_torchvision() -> dict[str, types.ModuleType]:
    def unavailable(name):
        raise RuntimeError(f"torchvision.transforms.functional.{name} is not available in this test environment")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.__getattr__ = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


def _forget(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def load_k_diffusion() -> KDiffusion:
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
        external = importlib.import_module("k_diffusion.external")
        return KDiffusion(sampling, external, None)
    except Exception as error:  # noqa: BLE001 - any failure of the real import selects the fallback
        reason = f"{type(error).__name__}: {error}"
    _forget("k_diffusion")
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["k_diffusion"] = package

    stand_ins = {}
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception:  # noqa: BLE001 - missing or broken torchvision
        _forget("torchvision")
        stand_ins = _stand_in_torchvision()
        sys.modules.update(stand_ins)
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
        external = importlib.import_module("k_diffusion.external")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return KDiffusion(sampling, external, reason)
