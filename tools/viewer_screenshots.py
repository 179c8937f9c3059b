#!/usr/bin/env python3
"""Screenshots of the atlas viewer for the docs: docs/viewer-{atlas,layer,unit,search}.png.

    .venv/bin/python tools/viewer_screenshots.py [ATLAS] [--out docs]

ATLAS is an atlas directory; without one, the demo atlas is rendered with a dataset into
a temporary directory (target/release/loupe, about a minute on the CPU: the dataset pass
gives it connections, the index trust indicators) and a few of its units are labelled
with `loupe label`. The viewer is the repository's viewer/, served next to the atlas (a
given atlas is not written to) by $LOUPE_VIEWER_SERVE or Python's http.server, and shot
in headless Chromium 1280 px wide: the layer grid sorted by a trust indicator, a unit
page whole (its label, images, trust, inputs and outputs, dataset examples) and a label
search. The PNGs are reduced to a 256-colour palette when Pillow is there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "browser"))
import cdp  # noqa: E402

# (name, hash, view, the whole page rather than the first 800 px, text typed in the search box)
VIEWS = [
    ("atlas", "#/", "atlas", False, None),
    ("layer", "#/layer/conv2?sort=above_dataset", "layer", False, None),
    ("unit", "#/layer/conv3/unit/5", "unit", True, None),
    ("search", "#/layer/conv3/unit/5", "unit", False, "red"),
]

# The demo atlas's labels, from what their top dataset examples show.
LABELS = [
    ("conv2", 9, "red"),
    ("conv2", 17, "red"),
    ("conv3", 5, "45° stripes, green"),
    ("conv3", 16, "blue"),
    ("conv3", 22, "red"),
]


def render_demo(out: Path) -> None:
    cmd = [
        str(ROOT / "target" / "release" / "loupe"), "render",
        "--model", str(ROOT / "models" / "demo" / "demo.pt"), "--out", str(out),
        "--techniques", "channel,neuron,negative", "--steps", "64", "--size", "64", "--device", "cpu",
        "--dataset", str(ROOT / "tests" / "fixtures" / "dataset" / "images"), "--examples", "4",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    for layer, unit, text in LABELS:
        subprocess.run([cmd[0], "label", str(out), layer, str(unit), text], cwd=ROOT, check=True)


def stage(atlas: Path, site: Path) -> None:
    """The viewer's files and links to the atlas's, so the atlas is served untouched."""
    for name in ("index.html", "viewer.js", "viewer.css"):
        (site / name).symlink_to(ROOT / "viewer" / name)
    for name in ("atlas.json", "layers", "labels.json"):
        if (atlas / name).exists():
            (site / name).symlink_to(atlas.resolve() / name)


def shrink(path: Path) -> None:
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    # The palette from median cut, then the image mapped onto it with dithering, which
    # keeps the smooth parts of the feature visualisations from banding.
    palette = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small = rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    small.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas", nargs="?", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="loupe-shots-") as tmp:
        atlas = args.atlas
        if atlas is None:
            atlas = Path(tmp) / "atlas"
            render_demo(atlas)
        site = Path(tmp) / "site"
        site.mkdir()
        stage(atlas, site)
        with cdp.serve(site, cwd=ROOT) as base, cdp.Browser.launch() as browser:
            page = browser.new_page(width=1280, height=800)
            for name, hash_, view, whole, search in VIEWS:
                page.goto("about:blank")  # a fresh load, not a same-document hash change
                page.goto(base + hash_)
                page.wait_for(f"document.body.dataset.ready === '{view}' && document.body.dataset.rendered === location.hash")
                if search:
                    page.eval(f"(q => {{ q.focus(); q.value = {json.dumps(search)}; q.dispatchEvent(new Event('input')); }})(document.getElementById('q'))")
                    page.wait_for("document.querySelectorAll('#search-results .hit').length > 0")
                page.wait_for("[...document.images].filter(i => i.getAttribute('src')).every(i => i.complete)")
                browser.pump(0.5)
                out = args.out / f"viewer-{name}.png"
                page.screenshot(out, full_page=whole)
                shrink(out)
                print(f"{out} ({out.stat().st_size // 1024} KiB)")
            if page.exceptions:
                sys.exit(f"the viewer threw: {page.exceptions}")


if __name__ == "__main__":
    main()
