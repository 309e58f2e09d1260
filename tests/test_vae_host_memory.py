"""Host memory for parked tiles (issue 19 §4): read with psutil where it imports (Windows, macOS, the WebUI's
environment), /proc/meminfo where not, per-tile statistics with a warning where neither answers; tiles computed
on CUDA park in pinned memory with non-blocking copies, the CPU path as before."""
import sys
import types

import pytest
import torch

from lib_hires.vae import default_overlap, memory, shared_norm, tiled_decode
from lib_hires.webui.decoding import VaeTiling
from tools.vae_factory import build_decoder

_original_meminfo = memory._meminfo_available
MEMINFO = "MemTotal:       16384000 kB\nMemFree:          100000 kB\nMemAvailable:    2000000 kB\n"


def fake_psutil(available=None, error=None):
    module = types.ModuleType("psutil")

    def virtual_memory():
        if error is not None:
            raise error
        return types.SimpleNamespace(available=available, total=4 * available)

    module.virtual_memory = virtual_memory
    return module


@pytest.fixture
def meminfo(tmp_path, monkeypatch):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    original = memory._meminfo_available
    monkeypatch.setattr(memory, "_meminfo_available", lambda: original(str(path)))
    return path


def test_psutil_is_asked_first(monkeypatch, meminfo):
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil(available=5 * 2 ** 30))
    assert memory.available_ram_bytes() == 5 * 2 ** 30


@pytest.mark.parametrize("psutil", [None, fake_psutil(error=PermissionError("no counters"))],
                         ids=["psutil missing", "psutil failing"])
def test_proc_meminfo_answers_without_psutil(monkeypatch, meminfo, psutil):
    monkeypatch.setitem(sys.modules, "psutil", psutil)   # None: ``import psutil`` raises ImportError
    assert memory.available_ram_bytes() == 2000000 * 1024


def test_neither_gives_none(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: _original_meminfo(str(tmp_path / "absent")))
    assert memory.available_ram_bytes() is None
    (tmp_path / "garbled").write_text("MemAvailable: lots\n")
    assert _original_meminfo(str(tmp_path / "garbled")) is None



class Model:
    def __init__(self):
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.decoder = build_decoder(0.125, seed=11)

    def decode_first_stage(self, z):
        return self.first_stage_model.decoder(z)


@pytest.mark.parametrize("free", [None, 1], ids=["unreadable", "too little"])
def test_without_the_memory_for_parking_the_tiles_are_normalised_each_on_its_own(monkeypatch, capsys, free):
    from lib_hires.webui import decoding

    monkeypatch.setattr(decoding, "available_ram_bytes", lambda: free)
    model, latent = Model(), torch.randn(1, 4, 24, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        per_tile = tiled_decode(model.decode_first_stage, latent, tile=8, overlap=default_overlap(8))
        whole_image = tiled_decode(model.first_stage_model.decoder, latent, tile=8, overlap=default_overlap(8))
        tiling = VaeTiling(model, choose=lambda m, z: 8 if max(z.shape[-2:]) > 8 else None, mode=lambda: "whole image")
        try:
            got = model.decode_first_stage(latent)
        finally:
            tiling.remove()
    torch.testing.assert_close(got, per_tile)
    assert not torch.allclose(got, whole_image, atol=1e-4)   # the fallback is a different result, not a no-op
    out = capsys.readouterr().out
    assert "normalises its tiles each on its own" in out
    assert ("cannot be read" in out) == (free is None) and ("need about" in out) == (free == 1)


@pytest.mark.parametrize("device,park,expected", [("cuda", "cpu", True), ("cpu", "cpu", False),
                                                  ("mps", "cpu", False), ("cuda", "cuda", False)])
def test_only_cuda_tiles_parked_on_the_host_are_pinned(device, park, expected):
    assert shared_norm.pins(torch.device(device), torch.device(park)) is expected


class CudaTensorStub:
    """What park_copy reads of a tile state on a CUDA device."""
    device = torch.device("cuda")
    shape = (1, 4, 6, 5)
    dtype = torch.float16


def test_a_cuda_tile_parks_pinned_with_a_non_blocking_copy(monkeypatch):
    calls = []

    class Kept:
        def copy_(self, src, non_blocking=False):
            calls.append(("copy_", src, non_blocking))
            return self

    def empty(shape, dtype=None, device=None, pin_memory=False):
        calls.append(("empty", tuple(shape), dtype, torch.device(device), pin_memory))
        return Kept()

    monkeypatch.setattr(shared_norm.torch, "empty", empty)
    source = CudaTensorStub()
    kept = shared_norm.park_copy(source, torch.device("cpu"), pinned=True)
    assert isinstance(kept, Kept)
    assert calls == [("empty", (1, 4, 6, 5), torch.float16, torch.device("cpu"), True), ("copy_", source, True)]


def test_the_cpu_path_parks_plain_contiguous_copies():
    t = torch.randn(1, 4, 8, 8)[..., 1:6, 2:7]
    for pinned in (False, True):   # a CPU tile is never pinned, whatever the pass decided
        kept = shared_norm.park_copy(t, torch.device("cpu"), pinned)
        assert kept.is_contiguous() and torch.equal(kept, t) and kept.data_ptr() != t.data_ptr()
        assert not kept.is_pinned()
