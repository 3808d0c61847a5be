#!/usr/bin/env bash
# Copy the official Infinity model code (no weights, no assets) into .official/Infinity, git-ignored, so the
# parity benchmark can import it on the GPU machine (pass `carry: [".official"]` to the device run).
# Source: a local bare mirror of FoundationVision/Infinity (default: the search tool's fetch location).
set -euo pipefail
MIRROR=${1:-/work/.mirror/FoundationVision+Infinity/repo}
DEST=$(cd "$(dirname "$0")/.." && pwd)/.official/Infinity
rm -rf "$DEST" && mkdir -p "$DEST"
for f in infinity/__init__.py infinity/models/__init__.py infinity/models/basic.py infinity/models/infinity.py \
         infinity/models/flex_attn.py infinity/models/fused_op.py infinity/utils/__init__.py infinity/utils/dist.py \
         infinity/utils/misc.py infinity/utils/dynamic_resolution.py; do
  mkdir -p "$DEST/$(dirname "$f")"
  git -C "$MIRROR" show "HEAD:$f" > "$DEST/$f" 2>/dev/null || touch "$DEST/$f"
done
git -C "$MIRROR" rev-parse HEAD > "$DEST/COMMIT"
echo "official Infinity code at $DEST (commit $(cat "$DEST/COMMIT"))"
