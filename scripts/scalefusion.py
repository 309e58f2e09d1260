"""ScaleFusion: ScaleCrafter and DemoFusion in the WebUI (txt2img, img2img, Hires. fix and the API).

Thin by design: the accordion is built from the settings table in ``lib_hires.settings``, and every hook
hands over to ``lib_hires.webui.job``.
"""
from __future__ import annotations

import html

from modules import script_callbacks, scripts, shared

from lib_hires.webui.forge import is_forge_model
from lib_hires.webui.forge import model as forge_model
from lib_hires.webui.forge.job import ForgeJob
from lib_hires.settings import DF, FIELDS, TITLE, ScaleFusionSettings, SettingsError
from lib_hires.summary import demofusion_summary, scalecrafter_summary
from lib_hires.webui import decoding, job, model_info, options, ui, xyz

try:
    from modules.infotext_utils import PasteField
except ImportError:  # WebUI before 1.8
    def PasteField(component, target, api=None):  # noqa: N802 - stands in for the class
        return component, target


def _pasted(params) -> ScaleFusionSettings | None:
    try:
        return ScaleFusionSettings.from_infotext(params)
    except SettingsError as error:
        job.log(f"ignoring pasted settings: {error}")
        return None


def _paste_target(field):
    if field.name == "enabled":
        return lambda params: TITLE in params

    def target(params):
        if field.infotext not in params and field.name != "method":
            return None  # keeps the current value; "enabled" already turns the extension off
        settings = _pasted(params)
        return None if settings is None or not settings.enabled else field.to_ui(getattr(settings, field.name))
    return target


def _summarize(settings: ScaleFusionSettings, width: int, height: int) -> tuple[str, str]:
    try:
        describe = forge_model.describe if is_forge_model(shared.sd_model) else model_info.describe
        info = describe(shared.sd_model, settings.native_size)
    except (model_info.UnsupportedModelError, AttributeError) as error:
        return html.escape(str(error)), ""
    if settings.method == DF:
        summary = demofusion_summary(info.train_size, width, height, settings)
    else:
        summary = scalecrafter_summary(info.family, info.train_size, width, height, settings, info.layout)
    details = "\n".join([summary.details, *(f"warning: {w}" for w in summary.warnings)])
    prefix = "" if settings.enabled else "off · "
    return (f"<span class='scalefusion-summary'>{html.escape(prefix + summary.header)}</span>",
            f"<pre class='scalefusion-plan'>{html.escape(details)}</pre>")


class ScaleFusionScript(scripts.Script):
    section = "accordions"
    create_group = False

    def __init__(self):
        super().__init__()
        self.accordion = None
        self.size_components = {}

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def after_component(self, component, **kwargs):
        # Width/Height are created after the accordions section: wire the summary once both exist.
        tab = "img2img" if self.is_img2img else "txt2img"
        if kwargs.get("elem_id") in (f"{tab}_width", f"{tab}_height"):
            self.size_components[kwargs["elem_id"].rsplit("_", 1)[1]] = component
            self._connect_size_events()

    def _connect_size_events(self):
        width, height = self.size_components.get("width"), self.size_components.get("height")
        if self.accordion is None or width is None or height is None or self.accordion.size_events:
            return
        ui.connect_size_limit(self.accordion.by_name["enabled"], width, height)
        ui.connect_summary(self.accordion, width, height, _summarize)
        self.accordion.size_events = True

    def ui(self, is_img2img):
        self.accordion = ui.build(options.defaults(shared.opts), self.elem_id)
        self._connect_size_events()
        self.infotext_fields = [PasteField(self.accordion.by_name[f.name], _paste_target(f)) for f in FIELDS]
        self.paste_field_names = []
        return self.accordion.components

    def before_process(self, p, *args):
        job_class = ForgeJob if is_forge_model(p.sd_model) else None  # the kind of model fixes the job's adapters
        job.begin(p, args, lambda: options.defaults(shared.opts, getattr(p, "override_settings", None)), job_class)

    def process(self, p, *args):
        active = job.job_of(p)
        if active is not None:
            active.write_infotext(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        active = job.job_of(p)
        if active is not None:
            active.start_pass(p, kwargs["x"])

    def post_sample(self, p, ps, *args):
        active = job.job_of(p)
        if isinstance(active, ForgeJob):
            active.post_sample(p, ps)
        elif active is not None:
            decoding.post_sample(p, ps)

    def postprocess(self, p, processed, *args):
        active = job.job_of(p)
        if active is not None:
            active.finish()


script_callbacks.on_cfg_denoiser(job.on_cfg_denoiser)
script_callbacks.on_model_loaded(job.on_model_loaded)  # a Hires checkpoint or refiner loaded inside p.sample
script_callbacks.on_ui_settings(lambda: options.register(shared))
# The API-only server builds the script UIs before on_before_ui fires, so the axes are added now as well
# (the X/Y/Z script, in the WebUI's own scripts folder, is loaded before any extension).
xyz.register(scripts.scripts_data)
script_callbacks.on_before_ui(lambda: xyz.register(scripts.scripts_data))
script_callbacks.on_script_unloaded(job.remove_all_hooks)
