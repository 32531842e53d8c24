#!/usr/bin/env bash
# The pure-Python packages MedPose imports that the GPU machine's image lacks (seen 2026-12-04: nibabel and
# segmentation_models_pytorch; torch, torchvision, timm, numba, scipy, opencv, matplotlib and pyyaml are there),
# copied from this checkout's venv into .pyextra/ (git-ignored here), to be carried with a device call:
#   bash benchmarks/gpu_carry_packages.sh             # here, once
#   run(carry=[".pyextra", ...]) ; the gpu_checks_hc18*.sh scripts put .pyextra on PYTHONPATH when it exists
set -eu
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p .pyextra
for pkg in ${PACKAGES:-nibabel segmentation_models_pytorch}; do
  [ -d "$site/$pkg" ] || { echo "$pkg: not in $site (make venv first)"; exit 2; }
  rm -rf ".pyextra/$pkg"; cp -r "$site/$pkg" .pyextra/
done
grep -qx "/.pyextra/" .git/info/exclude 2>/dev/null || echo "/.pyextra/" >> .git/info/exclude
du -sh .pyextra
