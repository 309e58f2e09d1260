"""The WebUI's refiner with DemoFusion: it takes over at "Switch at" of the FINAL stage.

The WebUI switches inside ``CFGDenoiser.forward`` (``sd_samplers_common.apply_refiner``): it loads the refiner,
rebuilds the conds with it (``p.setup_conds``, ``update_inner_model``) and drops the inner model, so the next
``cfg.inner_model`` is a new object. Left alone it would switch inside stage 1 and every later stage would sample
the refiner with conds of the base model and the fused denoiser patched on a discarded inner model. So:

* :class:`RefinerHold` hides ``p.refiner_checkpoint_info`` while the earlier stages sample (``apply_refiner`` then
  never switches) and gives it back for the final stage;
* :class:`RefinerSwitch` makes that same decision, with the same function, just before the CFG denoiser's call of
  each final-stage evaluation, so the stage patches can move to the refiner's inner model, and the call can take
  the conds the WebUI just built with the refiner, before any UNet call of the refiner happens.
"""
from __future__ import annotations


def refiner_of(p):
    return getattr(p, "refiner_checkpoint_info", None)


class RefinerHold:
    """``p.refiner_checkpoint_info`` is None until :meth:`release` (and after :meth:`remove`, as before)."""

    def __init__(self, p):
        self.p, self.info = p, refiner_of(p)
        p.refiner_checkpoint_info = None

    def release(self):
        self.p.refiner_checkpoint_info = self.info
        return self.info

    def remove(self) -> None:
        self.p.refiner_checkpoint_info = self.info


class RefinerSwitch:
    """Called with each final-stage evaluation's sigma; True once, right after the WebUI switched models."""

    def __init__(self, cfg_denoiser):
        self.cfg, self.done = cfg_denoiser, False

    def __call__(self, sigma) -> bool:
        if self.done:
            return False
        from modules import sd_samplers_common
        self.done = bool(sd_samplers_common.apply_refiner(self.cfg, sigma))
        return self.done
