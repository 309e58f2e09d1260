"""The demo and the benchmark run end to end (on tiny models, so CI checks the scripts themselves)."""
import json

from tools import benchmark, demo


def test_demo_runs_and_leaves_no_hooks(capsys):
    assert demo.main(["--steps", "4", "--demo-latent", "32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "official sd1.5_2048x2048" in out and "hooks left on the UNet: 0" in out


def test_demo_rejects_an_unknown_sampler(capsys):
    assert demo.main(["--sampler", "sample_nope"]) == 2


def test_benchmark_reports_every_ratio(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert benchmark.main(["--model-size", "tiny", "--spec", "sd1:256:64", "--rounds", "1", "--pairs", "2",
                           "--json", str(out_file)]) == 0
    (result,) = json.loads(out_file.read_text())
    assert result["ndcfg_samples"] == 1.5
    for key in ("redilation_time", "redilation_time_rounds", "dispersion_time_vs_precomputed", "dispersion_memory",
                "ndcfg_time"):
        assert result[key] > 0
    out = capsys.readouterr().out
    assert "re-dilation: time vs vanilla (median of 2 ABBA pairs)" in out and "ABBA pairs: " in out


def test_benchmark_precomputed_comparator_matches_the_engine_and_removes_itself():
    import torch

    from lib_hires.scalecrafter import ScaleCrafterController
    from lib_hires.scalecrafter.redilated_conv import ConvHook

    bench = benchmark.Bench(benchmark.Spec.parse("sd1:256:64"), "cpu", torch.float32, "tiny")
    plan = bench.plan_dispersed
    assert plan.dispersed
    with torch.no_grad(), ScaleCrafterController(bench.unet, plan) as controller:
        engine = bench.unet(bench.x[:1], bench.t[:1], **bench.cond_kwargs)
        with benchmark.precomputed_dispersion(bench.unet, controller) as used:
            precomputed = bench.unet(bench.x[:1], bench.t[:1], **bench.cond_kwargs)
        assert used[0] == len(plan.dispersed)
        assert all(isinstance(vars(bench.unet.get_submodule(p))["_conv_forward"], ConvHook) for p in plan.dispersed)
    assert ((precomputed - engine).abs().max() / engine.abs().max()).item() < 1e-5
    assert not any("_conv_forward" in vars(m) for m in bench.unet.modules())


def test_decode_benchmark_compares_tiled_and_full_side_by_side(tmp_path, capsys):
    from tools import benchmark_decode

    out_file = tmp_path / "decode.json"
    assert benchmark_decode.main(["--sizes", "128", "256", "--tile", "16", "--rounds", "1",
                                  "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "peak: tiled at 256² vs full at 128²" in out and "time: tiled vs full at 256²" in out
    result = json.loads(out_file.read_text())
    assert result["tile"] == 16 and result["width"] == 0.25
    for size in ("128", "256"):
        entry = result["sizes"][size]
        assert entry["full_peak"] > 0 and entry["tiled_peak"] > 0 and entry["time_ratio"] > 0
    assert result["sizes"]["256"]["tiled_peak"] < result["sizes"]["256"]["full_peak"]  # 16-px tiles: far less


def test_benchmark_thread_clock_counts_only_the_time_the_timed_thread_runs():
    import time

    import torch

    bench = benchmark.Bench(benchmark.Spec.parse("sd1:256:64"), "cpu", torch.float32, "tiny", clock="thread")
    assert bench._timed(lambda: time.sleep(0.3)) < 0.1  # a machine busy elsewhere looks like a sleep to the thread
    spin = bench._timed(lambda: sum(i * i for i in range(200_000)))
    assert spin > 0


def test_shared_prefix_benchmark_runs_on_the_thread_clock_with_one_torch_thread(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    out_file = tmp_path / "prefix.json"
    try:
        assert benchmark.main(["--model-size", "tiny", "--shared-prefix", "--clock", "thread", "--spec", "sd1:256:64",
                               "--rounds", "1", "--json", str(out_file)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    (result,) = json.loads(out_file.read_text())
    assert result["preset"] == "sd1.5_2048x2048" and 0 < result["f"] < 1
    assert all(s[0] > 0 for s in result["seconds"].values())
    assert "clock thread" in capsys.readouterr().out
