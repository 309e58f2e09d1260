"""The DemoFusion demo and benchmark run end to end on tiny models (CI checks the scripts themselves)."""
import json

from tools import benchmark_demofusion, demo_demofusion


def test_demo_prints_the_plan_views_and_calls_of_every_stage(capsys):
    assert demo_demofusion.main(["--width", "128", "--steps", "2", "--scales", "2", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "128x128 x2 -> 256x256" in out and "128x128 x2.5 -> 320x320" in out
    assert "stage 2 x2: latent 32x32, 13 views/step, model calls 2 (1/step), 52 UNet samples (13x stage 1)" in out
    # x2.5's last stage: 40x40 latent, dilation 3 -> 14x14 samples, a size the stand-in UNet needs padded
    # (2 calls per step, local views and samples having two sizes; at the last step, t = 0, c2 is 0 and the
    # samples' call is skipped exactly)
    assert "stage 3 x2.5: latent 40x40, 25 views/step, model calls 3 (1.5/step)" in out
    assert "calls padded to multiples of 8" in out


def test_demo_refuses_a_base_below_one_window(capsys):
    assert demo_demofusion.main(["--width", "56"]) == 2


def test_benchmark_counts_calls_and_reports_the_overhead(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert benchmark_demofusion.main(["--model-size", "tiny", "--base", "128", "--window", "16", "--rounds", "1",
                                      "--rows", "2", "--json", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    assert [(s["factor"], s["views"], s["samples"], s["calls"], s["expected_calls"]) for s in result["stages"]] == \
        [(2.0, 9, 4, 1, 1), (3.0, 25, 9, 3, 3)]
    assert all(s["overhead_ratio"] >= 1.0 for s in result["stages"])
    assert "fused call / sum of its model calls" in capsys.readouterr().out
