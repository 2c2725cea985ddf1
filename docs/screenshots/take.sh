#!/usr/bin/env bash
# Render the docs and take headless-Chromium screenshots of three pages; check none is blank.
#
#   apt-get install -y chromium libjs-mathjax     # once (Debian); not needed by CI
#   bash docs/screenshots/take.sh                 # -> docs/_build/screenshots/*.png
#
# The site is built into docs/_build/screenshot-html with a local MathJax (no network), so
# the formulas render as a reader would see them.  Not part of CI: CI has no browser.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=docs/_build/screenshots
HTML=docs/_build/screenshot-html
mkdir -p "$OUT"
MJ=/usr/share/javascript/mathjax/MathJax.js
if [ -f "$MJ" ]; then
  export KERNELGEO_DOCS_MATHJAX="file://$MJ?config=TeX-AMS-MML_HTMLorMML"
fi
"$PY" -m sphinx -W --keep-going -q -b html -j 1 docs "$HTML"
BROWSER=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$BROWSER" ]; then
  echo "chromium not found: apt-get install -y chromium" >&2
  exit 1
fi
for page in index theory/sphere tutorials/landscapes; do
  name=$(echo "$page" | tr / _)
  profile=$(mktemp -d)
  "$BROWSER" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
    --allow-file-access-from-files --virtual-time-budget=8000 --hide-scrollbars \
    --screenshot="$OUT/$name.png" --window-size=1280,1600 \
    "file://$PWD/$HTML/$page.html" >/dev/null 2>&1
  rm -rf "$profile"
done
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np
from matplotlib.image import imread

bad = []
for png in sorted(Path(sys.argv[1]).glob("*.png")):
    img = imread(png)[..., :3]
    std, dark = float(img.std()), float((img.mean(-1) < 0.5).mean())
    print(f"{png}: {img.shape[1]}x{img.shape[0]}, pixel std {std:.3f}, dark pixels {dark:.1%}")
    if std < 0.02 or dark < 0.005:
        bad.append(png.name)
if bad:
    sys.exit(f"blank screenshots: {bad}")
PY
