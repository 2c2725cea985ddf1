#!/usr/bin/env bash
# Screenshots of built pages with headless Chromium, and a check that none is blank.
#
#   apt-get install -y chromium          # once (Debian); not needed by CI
#   make screenshots                     # builds the docs, then -> docs/_build/screenshots/
#
# MathJax is part of the built site (docs/_ext/kgmathjax.py), so the formulas render as an
# offline reader sees them; the browser gets no network (proxy to a closed port).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HTML=${HTML:-docs/_build/html}
OUT=${OUT:-docs/_build/screenshots}
PAGES=${PAGES:-"index install cli theory/sphere adam tutorials/train_compare tutorials/report gallery"}
mkdir -p "$OUT"
if [ ! -f "$HTML/index.html" ]; then
  "$PY" -m sphinx -W --keep-going -q -b html -j 1 docs "$HTML"
fi
HTML_ABS=$(cd "$HTML" && pwd)
BROWSER=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$BROWSER" ]; then
  echo "chromium not found: apt-get install -y chromium" >&2
  exit 1
fi
for page in $PAGES; do
  name=$(echo "$page" | tr / _)
  profile=$(mktemp -d)
  "$BROWSER" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --proxy-server=127.0.0.1:9 --user-data-dir="$profile" --hide-scrollbars \
    --virtual-time-budget=10000 --screenshot="$OUT/$name.png" --window-size=1280,1600 \
    "file://$HTML_ABS/$page.html" >/dev/null 2>&1 || true
  rm -rf "$profile"
  if [ ! -s "$OUT/$name.png" ]; then
    echo "no screenshot of $HTML_ABS/$page.html" >&2
    exit 1
  fi
done
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path

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
