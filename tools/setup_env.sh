#!/usr/bin/env bash
# Creates .venv with what the engine's tests, demo and benchmark need (idempotent).
# The WebUI itself never runs this: it already ships torch, numpy, einops and k-diffusion.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade -c constraints.txt -r requirements-test.txt
# k-diffusion's declared dependencies include torchvision and clip, which do not work on a CPU-only
# machine here; the tests load its sampling module without them (tools/kdiffusion_compat.py).
$py -m pip install -q --no-deps -c constraints.txt "k-diffusion==0.1.1.post1"
$py -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__)"
