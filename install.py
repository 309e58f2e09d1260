"""Run by the WebUI at start-up (launch_utils.run_extension_installer).

The extension needs nothing the WebUI does not already ship (torch, numpy, einops, k-diffusion; the
dispersion transform is computed with torch, so no scipy). So this installs nothing; it only says so
clearly if the environment is missing one of those modules.
"""
import importlib.util
import sys

REQUIRED = ("torch", "numpy", "einops", "k_diffusion")

missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if missing:
    print(f"[ScaleCrafter/DemoFusion] the WebUI environment lacks {', '.join(missing)}, which the WebUI normally "
          "ships; the extension will not load until they are present.", file=sys.stderr)
