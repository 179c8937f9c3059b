"""Writes the small image dataset the dataset-statistics tests run on, with answers known
for the demo model (tools/make_demo_model.py): a few pure red, green and blue images
among mixed colours, grey noise and stripes, so that the top examples of the red, green
and blue logits are known.

    .venv/bin/python tools/make_test_dataset.py   # -> tests/fixtures/dataset/

Layout:
    images/     64 x 64 PNGs and JPEGs, plus broken.png (not an image: skipped, counted)
    tars/       the same images in two WebDataset .tar shards
    not-a-tar/  bad.tar, which is not a tar archive
"""
import io
import pathlib
import shutil
import tarfile

import numpy as np
from PIL import Image

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/dataset"
SIZE = 64
# Pure colours: the known top examples of logits 0 (red), 1 (green) and 2 (blue).
PURE = {"red": (230, 20, 20), "green": (20, 220, 30), "blue": (25, 30, 230)}


def images():
    rng = np.random.default_rng(7)
    out = {}
    for name, rgb in PURE.items():
        for i in range(2):
            shade = np.array(rgb) * (1.0 - 0.05 * i)
            out[f"pure-{name}-{i}.png"] = np.broadcast_to(shade, (SIZE, SIZE, 3))
    for i in range(12):
        # Muddy mixtures, a smooth gradient each: no channel dominates.
        base = rng.uniform(90, 170, size=3)
        ramp = np.linspace(-25, 25, SIZE)[None, :, None] * rng.uniform(-1, 1, size=3)
        out[f"mixed-{i:02d}.png"] = np.clip(base + ramp + np.zeros((SIZE, 1, 1)), 0, 255)
    for i, angle in enumerate((0, 45, 90, 135)):
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        t = np.deg2rad(angle)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.sin(t) - y * np.cos(t)) / 8)
        out[f"stripes-{angle:03d}.jpg"] = np.repeat(wave[..., None] * 255, 3, axis=2)
    for i in range(2):
        out[f"noise-{i}.jpg"] = rng.uniform(0, 255, size=(SIZE, SIZE, 3))
    return {k: Image.fromarray(np.asarray(v).astype(np.uint8)) for k, v in out.items()}


def encode(name, img):
    buf = io.BytesIO()
    img.save(buf, format="PNG" if name.endswith(".png") else "JPEG", quality=95)
    return buf.getvalue()


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    for d in ("images", "tars", "not-a-tar"):
        (OUT / d).mkdir(parents=True)
    files = {name: encode(name, img) for name, img in sorted(images().items())}
    for name, data in files.items():
        (OUT / "images" / name).write_bytes(data)
    (OUT / "images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG body")
    names = sorted(files)
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        with tarfile.open(OUT / f"tars/shard-{shard:03d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for name in part:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
                tar.addfile(info, io.BytesIO(files[name]))
    (OUT / "not-a-tar/bad.tar").write_bytes(b"plain text, not a tar archive\n" * 40)
    print(f"wrote {len(files)} images (+ broken.png) and 2 tar shards to {OUT}")


if __name__ == "__main__":
    main()
