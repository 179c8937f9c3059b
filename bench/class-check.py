#!/usr/bin/env python3
"""Scores the demo model's class logits 0..7 in an atlas with the checks of
cli/tests/semantics.rs: an image shows its class when the share of its pixels whose
brightest channel is the class's colour is > 0.5 (logits 0..3), or the share of its
structure tensor's strength at the class's stripe orientation is > 0.45 (logits 4..7).

  class-check.py ATLAS channel        each unit's channel image: its share, and whether
                                      it shows its class (bench/maco.sh)
  class-check.py ATLAS diversity [N]  how many of the N diversity images a unit (4) fail,
                                      and lucid's diversity similarity of each unit's
                                      images at the logits (the summed pairwise cosine
                                      over N; N - 1 when they are alike) (bench/diversity.sh)
"""
import sys

import numpy as np
import torch
from PIL import Image

COLOURS = {0: "red", 1: "green", 2: "blue", 3: "yellow"}
STRIPES = {4: 0.0, 5: 45.0, 6: 90.0, 7: 135.0}


def colour_share(rgb, colour):
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    brightest = {"red": (r > g) & (r > b), "green": (g > r) & (g > b), "blue": (b > r) & (b > g), "yellow": (r > b) & (g > b)}
    return brightest[colour].mean()


def blur(img, sigma):
    """Gaussian blur wrapping around, truncated at 3 sigma."""
    radius = int(np.ceil(3 * sigma))
    weights = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    weights /= weights.sum()
    for axis in (0, 1):
        img = sum(w * np.roll(img, -d, axis) for d, w in zip(range(-radius, radius + 1), weights))
    return img


def orientation_share(rgb, degrees):
    """The structure tensor's strength at the stripes' orientation (cli/tests/semantics.rs)."""
    grey = rgb.astype(np.float64).sum(-1) / 765.0
    at = lambda dr, dc: np.roll(grey, (-dr, -dc), (0, 1))
    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1)) - (at(1, -1) + 2 * at(1, 0) + at(1, 1))
    jxx, jyy, jxy = blur(gx * gx, 4.0), blur(gy * gy, 4.0), blur(gx * gy, 4.0)
    direction = np.degrees(0.5 * np.arctan2(2 * jxy, jxx - jyy)) % 180
    strength = np.hypot(jxx - jyy, 2 * jxy)
    diff = np.abs(direction - (degrees + 90) % 180)
    return strength[np.minimum(diff, 180 - diff) <= 22.5].sum() / strength.sum()


def similarity(logits, n):
    f = logits / logits.norm(dim=1, keepdim=True).clamp_min(1e-10)
    cos = f @ f.T
    return ((cos.sum() - cos.diagonal().sum()) / n).item()


def share(rgb, unit):
    return colour_share(rgb, COLOURS[unit]) if unit in COLOURS else orientation_share(rgb, STRIPES[unit])


def shows(rgb, unit):
    return share(rgb, unit) > (0.5 if unit in COLOURS else 0.45)


def read(atlas, unit, name):
    return np.asarray(Image.open(f"{atlas}/layers/logits/units/{unit}/{name}.png").convert("RGB"))


def channel(atlas):
    images = {unit: read(atlas, unit, "channel") for unit in range(8)}
    failing = sum(not shows(rgb, unit) for unit, rgb in images.items())
    print(f"{failing} of 8 images not showing their class; shares, units 0..7: " + " ".join(f"{share(rgb, unit):.2f}" for unit, rgb in images.items()))


def diversity(atlas, n):
    model = torch.jit.load("models/demo/demo.pt").eval()
    failing, sims = 0, []
    for unit in range(8):
        images = [read(atlas, unit, f"diversity-{i}") for i in range(n)]
        failing += sum(not shows(rgb, unit) for rgb in images)
        x = torch.stack([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255 for rgb in images])
        with torch.no_grad():
            sims.append(similarity(model(x)["logits"], n))
    print(f"{failing} of {8 * n} images not showing their class; similarity at the logits, units 0..7: " + " ".join(f"{s:.2f}" for s in sims))


def main():
    atlas, technique = sys.argv[1], sys.argv[2]
    if technique == "channel":
        channel(atlas)
    else:
        diversity(atlas, int(sys.argv[3]) if len(sys.argv) > 3 else 4)


if __name__ == "__main__":
    main()
