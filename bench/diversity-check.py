#!/usr/bin/env python3
"""Scores a diversity atlas of the demo model's class logits (bench/diversity.sh): for each
of logits 0..7, whether each of its N diversity images shows the class, with the checks of
cli/tests/semantics.rs (the share of pixels whose brightest channel is the class's colour,
> 0.5; the share of spectral energy at the class's stripe orientation, > 0.45), and lucid's
diversity similarity of the N images at the logits (the summed pairwise cosine over N; N - 1
when they are alike). Prints one line: images failing, then per unit the similarity.

Usage: diversity-check.py ATLAS [N]
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


def orientation_share(rgb, degrees):
    grey = rgb.astype(np.float64).sum(-1) / 765.0
    grey -= grey.mean()
    n = grey.shape[0]
    power = np.abs(np.fft.fft2(grey)) ** 2
    normal = (degrees + 90) % 180
    inside = total = 0.0
    for kr in range(n):
        for kc in range(n):
            fr = kr - n if kr > n // 2 else kr
            fc = kc - n if kc > n // 2 else kc
            if np.hypot(fr, fc) < 3:
                continue
            diff = abs(np.degrees(np.arctan2(-fr, fc)) % 180 - normal)
            total += power[kr, kc]
            if min(diff, 180 - diff) <= 22.5:
                inside += power[kr, kc]
    return inside / total


def similarity(logits, n):
    f = logits / logits.norm(dim=1, keepdim=True).clamp_min(1e-10)
    cos = f @ f.T
    return ((cos.sum() - cos.diagonal().sum()) / n).item()


def main():
    atlas, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    model = torch.jit.load("models/demo/demo.pt").eval()
    failing, sims = 0, []
    for unit in range(8):
        images = [np.asarray(Image.open(f"{atlas}/layers/logits/units/{unit}/diversity-{i}.png").convert("RGB")) for i in range(n)]
        for rgb in images:
            shown = colour_share(rgb, COLOURS[unit]) > 0.5 if unit in COLOURS else orientation_share(rgb, STRIPES[unit]) > 0.45
            failing += not shown
        x = torch.stack([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255 for rgb in images])
        with torch.no_grad():
            sims.append(similarity(model(x)["logits"], n))
    print(f"{failing} of {8 * n} images not showing their class; similarity at the logits, units 0..7: " + " ".join(f"{s:.2f}" for s in sims))


if __name__ == "__main__":
    main()
