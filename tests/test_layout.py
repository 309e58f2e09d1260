import pytest
import torch
from torch import nn

from lib_hires.scalecrafter import UnsupportedUNetError, canonical_layout, infer_family, scan_unet, training_size
from tests.conftest import tiny_unet

NEVER = ("input_blocks.0.0", "out.2")


def test_scanned_layout_of_the_real_module_tree_is_the_published_one(family, official_presets):
    layout = scan_unet(tiny_unet(family))
    assert layout == canonical_layout(family)
    published = {row[0] for row in official_presets["conv3x3_name_map"][family] if row[0] not in NEVER}
    assert set(layout.paths) == published and len(layout.paths) == len(published)
    assert layout.levels == (3 if family == "sdxl" else 4)


def test_groups_match_the_official_shorthand(family):
    layout = canonical_layout(family)
    group_of = {s.path: s.group for s in layout.sites}
    assert group_of["input_blocks.3.0.op"] == "D0"
    assert group_of["input_blocks.6.0.op"] == "D1"
    assert group_of["input_blocks.7.0.in_layers.2"] == "D2"
    assert group_of["middle_block.2.out_layers.3"] == "M"
    assert group_of["output_blocks.2.0.in_layers.2"] == "U0"
    assert group_of["output_blocks.8.0.out_layers.3"] == "U2"
    ups = {s.path: s.group for s in layout.sites if s.kind == "up"}
    if family == "sdxl":
        assert ups == {"output_blocks.2.2.conv": "U0", "output_blocks.5.2.conv": "U1"}
        assert "input_blocks.9.0.op" not in group_of
    else:
        assert ups == {"output_blocks.2.1.conv": "U0", "output_blocks.5.2.conv": "U1", "output_blocks.8.2.conv": "U2"}
        assert group_of["input_blocks.11.0.in_layers.2"] == "D3"
        assert group_of["output_blocks.11.0.out_layers.3"] == "U3"


def test_conv_in_conv_out_skip_and_attention_are_never_sites(family):
    unet = tiny_unet(family)
    sites = set(scan_unet(unet).paths)
    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d) and (module.kernel_size == (1, 1) or name in NEVER):
            assert name not in sites
    assert not any("transformer" in p or "skip_connection" in p or "proj_" in p for p in sites)
    # every site really is a 3x3 conv of the UNet
    for path in sites:
        conv = unet.get_submodule(path)
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)


def test_family_and_training_size():
    assert infer_family(tiny_unet("sdxl")) == "sdxl"
    assert infer_family(tiny_unet("sd1")) == "sd1"
    assert training_size("sd1") == 512
    assert training_size("sd2") == 512
    assert training_size("sd2", v_prediction=True) == 768
    assert training_size("sdxl") == 1024
    with pytest.raises(ValueError, match="family must be one of sd1, sd2, sdxl"):
        training_size("sd3")


def test_a_model_without_unet_blocks_is_refused():
    with pytest.raises(UnsupportedUNetError, match="input_blocks"):
        scan_unet(nn.Sequential(nn.Conv2d(4, 4, 3)))
