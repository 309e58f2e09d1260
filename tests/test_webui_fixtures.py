"""The real-WebUI suite's seeded fixtures (tests/integration/fixtures.py), checked without a WebUI.

The WebUI's venv ships CLIP's BPE merges with open_clip; here a synthetic merges file of the same length stands in,
so the vocabulary's construction, the files and their reuse are checked; the WebUI suite itself checks that the
tokenizer made from the real merges tokenizes as CLIP does.
"""
import gzip
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.integration import fixtures as fx
from tools import unet_factory

VOCAB = 49408
MERGES = VOCAB - 2 * 256 - 2


@pytest.fixture(scope="module")
def synthetic_bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "bpe.txt.gz"
    lines = ["#version: synthetic"] + [f"q{i} z" for i in range(MERGES)] + ["beyond the vocabulary"]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory, synthetic_bpe):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fx, "clip_bpe_file", lambda: synthetic_bpe)
        return fx.ensure_fixtures(tmp_path_factory.mktemp("webui") / "models")


def _files(models):
    return json.loads((models / fx.FOLDER / fx.MANIFEST).read_text())["files"]


def test_every_file_is_made_and_listed(made):
    files = _files(made.models)
    for name in ("Stable-diffusion/tiny-sd1.safetensors", "Stable-diffusion/tiny-sd1.yaml",
                 "Stable-diffusion/tiny-sdxl.safetensors", "Stable-diffusion/tiny-sdxl.yaml", "Lora/tiny.safetensors",
                 "Lora/tiny-sdxl.safetensors", "ControlNet/control_tiny_sd15_random.safetensors",
                 "VAE-approx/vaeapprox-sdxl.pt"):
        assert name in files and (made.models / name).is_file(), name
    assert all((made.models / name).is_file() for name in files)
    sd1_yaml = (made.models / "Stable-diffusion/tiny-sd1.yaml").read_text()
    tokenizer = made.folder / "tiny-sd1-clip"
    assert f'version: "{tokenizer}"' in sd1_yaml and (tokenizer / "vocab.json").is_file()
    assert f'arch: "{fx.OPEN_CLIP_ARCH}"' in (made.models / "Stable-diffusion/tiny-sdxl.yaml").read_text()
    assert json.loads(made.open_clip_config.read_text())["text_cfg"]["width"] == fx.SDXL_OPEN_CLIP.width


def test_the_vocabulary_is_clips_construction(made):
    vocab = json.loads((made.folder / "tiny-sd1-clip" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB and sorted(vocab.values()) == list(range(VOCAB))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["q0z"] == 512 and vocab[f"q{MERGES - 1}z"] == VOCAB - 3
    assert vocab["<|startoftext|>"] == VOCAB - 2 and vocab["<|endoftext|>"] == VOCAB - 1
    assert vocab[chr(256)] == 188  # byte 0, the first byte that is not printable, after the 188 printable ones
    merges = (made.folder / "tiny-sd1-clip" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1:] == [f"q{i} z" for i in range(MERGES)]


def test_a_second_run_reuses_the_files(made, synthetic_bpe, monkeypatch):
    before = {name: os.stat(made.models / name).st_mtime_ns for name in _files(made.models)}
    monkeypatch.setattr(fx, "clip_bpe_file", lambda: synthetic_bpe)
    monkeypatch.setattr(fx, "sd1_state", lambda: pytest.fail("the SD1 checkpoint was made again"))
    fx.ensure_fixtures(made.models)
    assert {name: os.stat(made.models / name).st_mtime_ns for name in _files(made.models)} == before


def test_the_checkpoints_have_the_real_layouts(made):
    sd1 = load_file(str(made.sd1))
    unet = unet_factory.UNetModel(fx.SD1_UNET)
    unet.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in sd1.items()
                          if k.startswith("model.diffusion_model.")}, strict=True)
    assert sd1["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (VOCAB, 32)
    assert sd1["first_stage_model.decoder.conv_in.weight"].shape == (128, 4, 3, 3)  # ch 32 x ch_mult 4
    assert sd1["alphas_cumprod"].shape == (1000,) and 0 < sd1["alphas_cumprod"][-1] < sd1["alphas_cumprod"][0] < 1
    sdxl = load_file(str(made.sdxl))
    assert sdxl["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 1600)
    assert sdxl["conditioner.embedders.1.model.text_projection"].shape == (64, fx.SDXL_POOLED)
    controlnet = load_file(str(made.models / "ControlNet/control_tiny_sd15_random.safetensors"))
    encoder = [k for k in controlnet if k.startswith(("input_blocks.", "middle_block.", "time_embed."))]
    assert encoder and all(torch.equal(controlnet[k], sd1["model.diffusion_model." + k]) for k in encoder)
    assert controlnet["zero_convs.11.0.weight"].shape == (128, 128, 1, 1)


@pytest.mark.parametrize("lora,checkpoint,family", [("tiny", "tiny-sd1", "sd1"), ("tiny-sdxl", "tiny-sdxl", "sdxl")])
def test_each_lora_fits_its_checkpoints_layers(made, lora, checkpoint, family):
    """Every LoRA module names a layer of its checkpoint, and up @ down has that layer's weight shape."""
    weights = load_file(str(made.models / "Stable-diffusion" / f"{checkpoint}.safetensors"))
    cfg = fx.SD1_UNET if family == "sd1" else fx.SDXL_UNET
    layers = {}
    for key, value in weights.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".weight") and value.ndim in (2, 4):
            name = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            kohya = fx.diffusers_unet_name(name, cfg) if family == "sd1" else name
            layers["lora_unet_" + kohya.replace(".", "_")] = value.shape
    towers = {"sd1": {"lora_te_": "cond_stage_model.transformer."},
              "sdxl": {"lora_te1_": "conditioner.embedders.0.transformer."}}[family]
    for key, value in weights.items():
        for prefix, root in towers.items():
            if key.startswith(root) and key.endswith("proj.weight") or key.startswith(root) and ".mlp.fc" in key \
                    and key.endswith(".weight"):
                layers[prefix + key.removeprefix(root).removesuffix(".weight").replace(".", "_")] = value.shape
    state = load_file(str(made.models / "Lora" / f"{lora}.safetensors"))
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in state}
    checked = 0
    for module in sorted(modules):
        down, up = state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"]
        assert state[f"{module}.alpha"].item() == down.shape[0] == fx.LORA_RANK
        if module.startswith("lora_te2_"):  # OpenCLIP in HF names: the Lora extension maps them to in_proj
            continue
        assert module in layers, f"{module} names no layer of {checkpoint}"
        assert (up.shape[0], *down.shape[1:]) == tuple(layers[module]), module
        checked += 1
    assert checked > 100


def test_diffusers_names_of_sd1_layers():
    cfg = fx.SD1_UNET
    assert fx.diffusers_unet_name("input_blocks.0.0", cfg) == "conv_in"
    assert fx.diffusers_unet_name("input_blocks.3.0.op", cfg) == "down_blocks.0.downsamplers.0.conv"
    assert fx.diffusers_unet_name("input_blocks.4.0.skip_connection", cfg) == "down_blocks.1.resnets.0.conv_shortcut"
    assert fx.diffusers_unet_name("input_blocks.5.1.proj_in", cfg) == "down_blocks.1.attentions.1.proj_in"
    assert fx.diffusers_unet_name("middle_block.1.transformer_blocks.0.attn2.to_k", cfg) == \
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    assert fx.diffusers_unet_name("middle_block.2.emb_layers.1", cfg) == "mid_block.resnets.1.time_emb_proj"
    assert fx.diffusers_unet_name("output_blocks.2.1.conv", cfg) == "up_blocks.0.upsamplers.0.conv"
    assert fx.diffusers_unet_name("output_blocks.8.2.conv", cfg) == "up_blocks.2.upsamplers.0.conv"
    assert fx.diffusers_unet_name("output_blocks.11.1.transformer_blocks.0.ff.net.2", cfg) == \
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"
    assert fx.diffusers_unet_name("out.2", cfg) == "conv_out"
    names = [fx.diffusers_unet_name(n, cfg) for n, _ in fx._unet_layers(cfg, blocks_only=False)]
    assert len(names) == len(set(names)) > 200


def test_a_file_it_did_not_write_is_never_overwritten(tmp_path):
    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "Lora" / "tiny.safetensors").write_bytes(b"someone else's")
    with pytest.raises(fx.FixtureConflict, match="Lora/tiny.safetensors"):
        fx.ensure_fixtures(models)
    assert (models / "Lora" / "tiny.safetensors").read_bytes() == b"someone else's"
    assert not (models / "Stable-diffusion").exists()


def test_a_link_in_the_way_is_replaced_and_its_target_kept(tmp_path, synthetic_bpe, monkeypatch):
    monkeypatch.setattr(fx, "clip_bpe_file", lambda: synthetic_bpe)
    for maker in ("sd1_state", "sdxl_state", "sd1_lora_state", "sdxl_lora_state", "controlnet_sd1_state"):
        monkeypatch.setattr(fx, maker, lambda: {"w": torch.zeros(1)})
    models, theirs = tmp_path / "models", tmp_path / "shared-tiny.safetensors"
    theirs.write_bytes(b"shared")
    (models / "Lora").mkdir(parents=True)
    (models / "Lora" / "tiny.safetensors").symlink_to(theirs)
    fx.ensure_fixtures(models)
    assert not (models / "Lora" / "tiny.safetensors").is_symlink() and theirs.read_bytes() == b"shared"
    assert "Lora/tiny.safetensors" in _files(models)


def test_a_changed_generator_replaces_only_its_own_files(tmp_path, synthetic_bpe, monkeypatch):
    tiny = {"w": torch.zeros(1)}
    monkeypatch.setattr(fx, "clip_bpe_file", lambda: synthetic_bpe)
    for maker in ("sd1_state", "sdxl_state", "sd1_lora_state", "sdxl_lora_state", "controlnet_sd1_state"):
        monkeypatch.setattr(fx, maker, lambda: tiny)
    models = tmp_path / "models"
    fx.ensure_fixtures(models)
    (models / "Lora" / "a-users-own.safetensors").write_bytes(b"kept")
    assert torch.equal(load_file(str(models / "Stable-diffusion/tiny-sd1.safetensors"))["w"], torch.zeros(1))
    monkeypatch.setattr(fx, "generator_digest", lambda models: "another-version")
    monkeypatch.setattr(fx, "sd1_state", lambda: {"w": torch.ones(1)})
    fx.ensure_fixtures(models)
    assert torch.equal(load_file(str(models / "Stable-diffusion/tiny-sd1.safetensors"))["w"], torch.ones(1))
    assert (models / "Lora" / "a-users-own.safetensors").read_bytes() == b"kept"
    assert json.loads((models / fx.FOLDER / fx.MANIFEST).read_text())["generator"] == "another-version"
