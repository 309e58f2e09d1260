"""Large outputs through an SD VAE: tiled decodes and encodes whose GroupNorms see the whole image, with the
working memory of one tile, a tile size from the memory at hand, and small previews.

Dependencies run one way: ``layout`` (tiles and their blend) <- ``memory`` (what a pass needs, what the machine
has) and ``shared_norm`` (a VAE module run step by step across tiles) <- ``passes`` (the tiled decode and encode);
``previews`` stands alone. The WebUI and Forge adapters import only the names below.
"""
from .layout import MAX_TILE, MIN_TILE, PREFERRED_TILE, default_overlap, tile_layout
from .memory import available_ram_bytes, choose_tile, decoder_peak_bytes
from .passes import GROUPNORM_CHOICES, tiled_apply, tiled_decode, tiled_encode
from .previews import PREVIEW_MAX_SIDE, shrink_latent
from .shared_norm import HostMemoryShort, UnsupportedVAE, last_pass, parked_bytes, program_of, shared_norm_forward

__all__ = ["MAX_TILE", "MIN_TILE", "PREFERRED_TILE", "PREVIEW_MAX_SIDE", "GROUPNORM_CHOICES", "HostMemoryShort",
           "UnsupportedVAE", "available_ram_bytes", "choose_tile", "decoder_peak_bytes", "default_overlap",
           "last_pass", "parked_bytes", "program_of", "shared_norm_forward", "shrink_latent", "tile_layout",
           "tiled_apply", "tiled_decode", "tiled_encode"]
