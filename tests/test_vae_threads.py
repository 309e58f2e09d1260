"""Two threads decoding through one decoder at once (issue 19 §3): the final tiled decode on the main thread and
a live preview on the progress thread share the VAE. A shared-norm pass must change nothing the other can see."""
import threading
import time

import pytest
import torch

from lib_hires.vae import shared_norm_forward
from tools.vae_factory import build_decoder

TILE, OVERLAP = 16, 4
ROUNDS = 4


@pytest.fixture(scope="module")
def decoder():
    decoder = build_decoder(0.125, seed=7)
    # widen the window in which the attention block runs (where the old pass swapped its norm), so that the two
    # threads meet inside it in every round on any machine; the hook itself changes no value
    decoder.mid.attn_1.q.register_forward_pre_hook(lambda module, args: time.sleep(0.002))
    return decoder


def latents(seed, side=32):
    return torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(seed))


def same(got, expected):
    # the same ops on the same shapes: equal up to float rounding at most (the old pass differed by ~1e-2 or failed)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def run_together(*jobs):
    """Runs the callables on threads started at the same moment; their results, or the first error raised."""
    start = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(i, job):
        start.wait()
        try:
            results[i] = job()
        except BaseException as error:  # noqa: BLE001 - reported on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]
    return results


def test_two_shared_norm_passes_at_once_each_equal_the_sequential_result(decoder):
    a, b = latents(1), latents(2, side=28)
    with torch.no_grad():
        expected = [shared_norm_forward(decoder, a, tile=TILE, overlap=OVERLAP),
                    shared_norm_forward(decoder, b, tile=TILE, overlap=OVERLAP)]
    for _ in range(ROUNDS):
        got = run_together(lambda: shared_norm_forward(decoder, a, tile=TILE, overlap=OVERLAP),
                           lambda: shared_norm_forward(decoder, b, tile=TILE, overlap=OVERLAP))
        for g, e in zip(got, expected):
            same(g, e)


def test_a_plain_preview_decode_beside_a_shared_norm_pass_is_the_plain_decode(decoder):
    """The progress thread's preview runs the decoder's own forward: it must keep its per-image norm."""
    final, preview = latents(3), latents(4, side=12)
    with torch.no_grad():
        expected_final = shared_norm_forward(decoder, final, tile=TILE, overlap=OVERLAP)
        expected_preview = decoder(preview)

    def plain():
        with torch.no_grad():
            return [decoder(preview) for _ in range(3)]

    for _ in range(ROUNDS):
        got_final, got_previews = run_together(lambda: shared_norm_forward(decoder, final, tile=TILE, overlap=OVERLAP),
                                               plain)
        same(got_final, expected_final)
        for got in got_previews:
            same(got, expected_preview)


def test_the_attention_block_is_left_as_it_was(decoder):
    block = decoder.mid.attn_1
    before = (dict(block._modules), dict(vars(block)))
    shared_norm_forward(decoder, latents(5), tile=TILE, overlap=OVERLAP)
    assert dict(block._modules) == before[0] and dict(vars(block)).keys() == before[1].keys()
    assert isinstance(block.norm, torch.nn.GroupNorm)
