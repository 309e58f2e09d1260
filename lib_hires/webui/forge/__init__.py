"""Adapters for stable-diffusion-webui-forge, beside ``lib_hires.webui`` (AUTOMATIC1111).

Forge keeps the WebUI's Script API but samples through its own engine (``backend.*``): the UNet is
``sd_model.forge_objects.unet.model.diffusion_model``, CFG runs in ``backend.sampling.sampling_function`` and
extensions patch a clone of the ``UnetPatcher``. A job picks its adapters once, from the model object.
Forge's own modules (``backend``, ``modules``) are imported inside functions only, so all of this imports
(and is tested with fakes) without Forge.
"""
from __future__ import annotations


def is_forge_model(sd_model) -> bool:
    """Whether ``sd_model`` is one of Forge's: its engines (``ForgeDiffusionEngine``) carry ``forge_objects``.

    Until the first generation loads a checkpoint Forge holds a placeholder, ``modules.sd_models.FakeInitialModel``
    (``before_process`` runs before that load): it is Forge's too, and the job checks the loaded model later.
    """
    if hasattr(sd_model, "forge_objects"):
        return True
    kind = type(sd_model)
    return kind.__name__ == "FakeInitialModel" and kind.__module__ == "modules.sd_models"
