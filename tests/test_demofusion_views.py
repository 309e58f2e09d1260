"""Local views (demofusion.md §1.5): the official grid, edge-aware jitter, complete coverage at every size."""
import pytest
import torch

from lib_hires.demofusion import coverage, grid_size, jitter_range, local_views, plan_stages, view_starts


def test_the_unjittered_grid_is_the_official_one():
    # official SDXL stages, window 128, stride 64: 3x3, 5x5, 7x7 views
    assert [grid_size(n, n, 128, 64) for n in (256, 384, 512)] == [(3, 3), (5, 5), (7, 7)]
    assert view_starts(256, 128, 64) == [0, 64, 128]
    # a window running past the end is shifted back to end at the edge
    assert view_starts(200, 128, 64) == [0, 64, 72]
    assert view_starts(128, 128, 64) == [0]
    views = local_views(256, 256, 128, 64)
    assert jitter_range(128, 64) == 16
    assert [(v.h0, v.h1) for v in views[::3]] == [(16, 144), (80, 208), (144, 272)]  # padded frame, jitter off


def test_an_axis_shorter_than_the_window_gets_one_view_of_exactly_that_axis():
    views = local_views(40, 100, 64, 32, torch.Generator().manual_seed(0))
    pad = jitter_range(64, 32)
    assert len(views) == 3  # starts 0, 32 and 36 along the width
    assert all((v.h0, v.h1) == (pad, pad + 40) and v.size == (40, 64) for v in views)


def stage_sizes():
    sizes = {(64, 64), (40, 100), (100, 40), (33, 65), (8, 8), (71, 129)}
    for base, scale in (((512, 512), 2.5), ((512, 768), 3.2), ((832, 1216), 1.5), ((1024, 576), 2.0),
                        ((520, 712), 3.7)):
        plan = plan_stages(*base, scale, window=64)
        sizes.update(st.latent_size for st in plan.stages)
    return sorted(sizes)


@pytest.mark.parametrize("window,stride", [(64, 32), (64, 64), (64, 8), (64, 5), (128, 64), (48, 40), (16, 12)])
def test_views_cover_every_pixel_stay_in_the_padded_frame_and_jitter_by_the_edge_rule(window, stride):
    pad = jitter_range(window, stride)
    gen = torch.Generator().manual_seed(window * 1000 + stride)
    for height, width in stage_sizes():
        plain = local_views(height, width, window, stride)
        for _ in range(3):
            views = local_views(height, width, window, stride, gen)
            assert len(views) == len(plain)
            assert coverage(views, height, width).min() >= 1
            assert len({v.size for v in views}) == 1
            for v, p in zip(views, plain):
                assert v.pad == pad and 0 <= v.h0 and v.h1 <= height + 2 * pad and 0 <= v.w0 and v.w1 <= width + 2 * pad
                for moved, start, end, length in ((v.h0 - p.h0, p.h0 - pad, p.h1 - pad, height),
                                                  (v.w0 - p.w0, p.w0 - pad, p.w1 - pad, width)):
                    lo = -pad if end < length else 0   # an edge window only moves outwards
                    hi = pad if start > 0 else 0
                    assert lo <= moved <= hi


def test_jitter_reaches_both_ends_of_its_range():
    gen = torch.Generator().manual_seed(0)
    pad = jitter_range(64, 32)
    moves = {"first": set(), "inner": set(), "last": set()}
    plain = local_views(192, 64, 64, 32)  # 5 views down one column
    for _ in range(200):
        for k, (v, p) in enumerate(zip(local_views(192, 64, 64, 32, gen), plain)):
            moves["first" if k == 0 else "last" if k == len(plain) - 1 else "inner"].add(v.h0 - p.h0)
            assert v.w0 == p.w0  # the width is one window: both edges, no jitter
    assert moves == {"first": set(range(-pad, 1)), "inner": set(range(-pad, pad + 1)), "last": set(range(0, pad + 1))}
