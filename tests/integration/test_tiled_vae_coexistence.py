"""ScaleFusion next to Tiled VAE (multidiffusion-upscaler) in a real WebUI, with a stand-in of the state its
hook leaves on the loaded model's VAE: a ``VAEHook`` object as the module's forward while it is on, and the
``original_forward`` attribute it keeps after it is turned off. Only the installed hook counts."""
import pytest

from tests.integration.test_api_demofusion import demofusion

pytestmark = pytest.mark.usefixtures("fresh_plain")
TILE = 16  # latent px: the 512² result (a 64² latent) is decoded in tiles by ScaleFusion


class VAEHook:
    """Stands in for Tiled VAE's hook: holds its module as ``net``, records the inputs it is handed and runs
    the module's own forward (the real one would tile them itself)."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return self.net.original_forward(x)


@pytest.fixture
def vae_parts(webui):
    vae = webui.sd_model.first_stage_model
    parts = {"decoder": vae.decoder, "encoder": vae.encoder}
    yield parts
    for part in parts.values():
        vars(part).pop("forward", None)
        vars(part).pop("original_forward", None)


def _install(part):
    if not hasattr(part, "original_forward"):
        part.original_forward = part.forward
    part.forward = VAEHook(part)
    return part.forward


def _turn_off(part):
    part.forward.net = None
    part.forward = part.original_forward


@pytest.fixture
def decoder_layer_inputs(vae_parts):
    seen = []
    handle = vae_parts["decoder"].conv_in.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    yield seen
    handle.remove()


def _request(txt2img):
    return txt2img(override_settings={"scalefusion_decode_tile": TILE}, alwayson_scripts=demofusion(scale=2))


def test_a_leftover_of_tiled_vae_does_not_stop_the_tiled_decode(txt2img, vae_parts, decoder_layer_inputs):
    for part in vae_parts.values():
        _install(part)
        _turn_off(part)  # Tiled VAE used once in this session, then turned off
    result = _request(txt2img)
    assert result.status == 200, result.json
    assert result.size == (512, 512)
    assert decoder_layer_inputs and max(max(s) for s in decoder_layer_inputs) < 64  # the 64² latent only in tiles
    params = result.params()
    assert params["ScaleFusion VAE"].startswith(f"ScaleFusion tiled decode ({TILE * 8} px tiles")
    assert params.get("VAE Decoder", "Full") == "Full"


def test_an_installed_tiled_vae_hook_gets_the_decode_and_the_infotext_says_so(txt2img, vae_parts, capsys):
    hooks = {name: _install(part) for name, part in vae_parts.items()}
    capsys.readouterr()
    result = _request(txt2img)
    assert result.status == 200, result.json
    assert result.size == (512, 512)
    assert (64, 64) in hooks["decoder"].calls  # the final decode, whole, handed to the hook
    assert result.params()["ScaleFusion VAE"] == "left to Tiled VAE"
    assert capsys.readouterr().out.count("Tiled VAE (multidiffusion-upscaler) is hooked") == 1
    assert vae_parts["decoder"].forward is hooks["decoder"]  # still installed: removing it is Tiled VAE's job
