"""Issue 19 in a real WebUI: the encode/decode guard on a Hires checkpoint loaded inside the job (§2), and
DemoFusion's later stages following a prompt-editing schedule over their own steps (§5)."""
import pytest
import torch

from tests.integration.test_api_demofusion import demofusion
from tests.integration.test_api_scalecrafter import assert_clean, scalefusion

pytestmark = pytest.mark.usefixtures("fresh_plain")


@pytest.fixture
def encoder_inputs_by_model(webui):
    """(checkpoint name, image size) for every input the first layer of any model's VAE encoder is given, the models
    loaded during the test included (hooked as they load, after the extension's own callback)."""
    from modules import script_callbacks, sd_models

    seen, handles, hooked = [], [], set()

    def hook(model):
        encoder = getattr(getattr(model, "first_stage_model", None), "encoder", None)
        if encoder is None or id(encoder) in hooked:
            return
        hooked.add(id(encoder))
        handles.append(encoder.conv_in.register_forward_pre_hook(
            lambda module, args: seen.append((model.sd_checkpoint_info.name_for_extra, tuple(args[0].shape[-2:])))))

    for model in sd_models.model_data.loaded_sd_models:
        hook(model)
    script_callbacks.on_model_loaded(hook)
    yield seen
    script_callbacks.remove_callbacks_for_function(hook)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("limit", [1, 2], ids=["weights into the same object", "new model object"])
def test_the_hires_encode_on_a_hires_checkpoint_sees_only_tiles(webui, txt2img, fresh_plain, perturbed_checkpoint,
                                                                encoder_inputs_by_model, limit):
    """The pixel-upscaled images are encoded on the hires model before any pass hook (process_before_every_sampling)
    has seen it: with a 16-latent-px tile (128 px) the encoder's layers get only tiles of the 512 px image."""
    hires = dict(width=256, height=256, steps=2, enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
                 denoising_strength=0.5, hr_second_pass_steps=2, hr_checkpoint_name=perturbed_checkpoint)
    options = {"sd_checkpoints_limit": limit, "scalefusion_decode_tile": 16}
    result = txt2img(**hires, override_settings=options, alwayson_scripts=scalefusion(method="ScaleCrafter",
                                                                                    passes="hires"))
    assert result.status == 200, result.json
    assert result.size == (512, 512) and result.params()["Hires checkpoint"]
    # named when the encoder runs: with limit 1 the job's own model object, holding the hires weights by then
    on_hires = [size for name, size in encoder_inputs_by_model if name == perturbed_checkpoint]
    assert len(on_hires) > 2 and max(max(size) for size in on_hires) <= 128
    encoder_inputs_by_model.clear()
    plain = txt2img(**hires, override_settings={"sd_checkpoints_limit": limit})
    assert plain.status == 200, plain.json
    assert (512, 512) in [size for _, size in encoder_inputs_by_model]  # the WebUI's own encode: one pass
    from modules import sd_models
    for model in sd_models.model_data.loaded_sd_models:  # the hires model's patches came off with the job
        assert "decode_first_stage" not in vars(model)
        assert "forward" not in vars(model.first_stage_model.encoder)
        assert "forward" not in vars(model.first_stage_model.decoder)
    assert_clean(webui, txt2img, fresh_plain)


@pytest.fixture
def cond_record(webui):
    """One (latent side, CFG denoiser step, cond rows) per CFG denoiser call."""
    from modules import script_callbacks

    record = []

    def note(params):
        record.append((params.x.shape[-1], params.denoiser.step, params.text_cond.detach().clone()))

    script_callbacks.on_cfg_denoiser(note)
    yield record
    script_callbacks.remove_callbacks_for_function(note)


def test_a_later_stage_of_other_steps_switches_an_edited_prompt_at_its_own_fraction(webui, txt2img, fresh_plain,
                                                                                   cond_record):
    """[castle:ruins:0.8]: stage 1 (30 steps) switches after its step 24, the 18-step later stage after its step 14
    (with stage 1's conds it would never switch)."""
    result = txt2img(prompt="a [castle:ruins:0.8] at dusk", width=128, height=128, steps=30,
                     alwayson_scripts=demofusion(scale=2, later_steps=18))
    assert result.status == 200, result.json
    first = [(step, cond) for side, step, cond in cond_record if side == 16]
    later = [(step, cond) for side, step, cond in cond_record if side == 32]
    assert [step for step, _ in first] == list(range(30)) and [step for step, _ in later] == list(range(18))
    castle, ruins = first[0][1], first[-1][1]
    same = lambda a, b: torch.allclose(a, b, atol=1e-6)  # noqa: E731 - the later conds are encoded anew
    assert not same(castle, ruins)
    assert [step for step, cond in first if same(cond, ruins)] == list(range(25, 30))
    assert [step for step, cond in later if same(cond, ruins)] == [15, 16, 17]
    assert all(same(cond, castle) for step, cond in later if step < 15)
    assert_clean(webui, txt2img, fresh_plain)
