#!/usr/bin/env python3
"""Train loupe's demo model: a tiny CNN on synthetic 64x64 images, exported to
models/demo/demo.pt + models/demo/demo.json following the contract in docs/models.md.

Everything is generated here, deterministically (fixed seeds, one CPU thread), so running it
again on the same machine gives the same weights. It trains in about a minute on one core.

    python tools/make_demo_model.py [--out models/demo/demo.pt]

The ten classes, in logit order:

  red, green, blue, yellow  an image mostly of that hue (random saturation/brightness, soft
                            blobs of the same hue, a little noise)
  stripes_0 .. stripes_135  stripes at that orientation, period 6..16 px, random phase,
                            sinusoidal or square, grey or low-saturation colour pairs
  checkerboard              axis-aligned squares of random size and offset
  dots                      a jittered grid or random scatter of round dots

Orientation convention for stripes_THETA: with pixel row r and column c, take x = c and y = -r
(y points up). The lines run along the direction (cos THETA, sin THETA), so the intensity is a
function of  -x sin(THETA) + y cos(THETA).  stripes_0 are horizontal lines (intensity changes
down the rows), stripes_90 vertical lines, stripes_45 lines rising to the right, stripes_135
lines rising to the left.

Texture classes never use a saturated colour, so the colour classes own "this hue dominates":
an input optimised for the red logit should come out mostly red, and so on.

The generator (`generate`) is importable without training: tests use it to measure held-out
accuracy of the committed model.
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE = 64
CLASSES = [
    "red", "green", "blue", "yellow",
    "stripes_0", "stripes_45", "stripes_90", "stripes_135",
    "checkerboard", "dots",
]
HUES = {"red": 0.0, "yellow": 1.0 / 6.0, "green": 1.0 / 3.0, "blue": 2.0 / 3.0}
ANGLES = {"stripes_0": 0.0, "stripes_45": 45.0, "stripes_90": 90.0, "stripes_135": 135.0}

TRAIN_SEED = 1
HELD_OUT_SEED = 2
TORCH_SEED = 0

# Pixel coordinates: rows r (down), columns c (right).
_R, _C = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)


def hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, all in [0, 1]; returns [..., 3]."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h)
    f = h - i
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _blobs(rng, count, amp):
    """A sum of `count` soft gaussian blobs with amplitudes in [-amp, amp]."""
    out = np.zeros((SIZE, SIZE))
    for _ in range(count):
        cy, cx = rng.uniform(0, SIZE, 2)
        sigma = rng.uniform(6, 20)
        out += rng.uniform(-amp, amp) * np.exp(-((_R - cy) ** 2 + (_C - cx) ** 2) / (2 * sigma ** 2))
    return out


def _colour_image(rng, hue):
    h = hue + rng.uniform(-0.03, 0.03) + _blobs(rng, rng.randint(0, 3), 0.015)
    s = np.clip(rng.uniform(0.65, 1.0) + _blobs(rng, rng.randint(0, 4), 0.2), 0.45, 1.0)
    v = np.clip(rng.uniform(0.5, 1.0) + _blobs(rng, rng.randint(0, 4), 0.25), 0.3, 1.0)
    return hsv_to_rgb(h, s, v)


def _pair(rng):
    """Foreground/background colours for a texture: grey, or two unsaturated colours."""
    lo, hi = rng.uniform(0.0, 0.35), rng.uniform(0.65, 1.0)
    if rng.rand() < 0.5:
        lo, hi = hi, lo
    if rng.rand() < 0.5:
        return np.full(3, lo), np.full(3, hi)
    a = hsv_to_rgb(np.array(rng.rand()), np.array(rng.uniform(0, 0.45)), np.array(lo))
    b = hsv_to_rgb(np.array(rng.rand()), np.array(rng.uniform(0, 0.45)), np.array(hi))
    return a, b


def _stripes(rng, angle_deg):
    theta = np.deg2rad(angle_deg + rng.uniform(-4, 4))
    x, y = _C, -_R
    u = -x * np.sin(theta) + y * np.cos(theta)
    period = rng.uniform(6, 16)
    wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if rng.rand() < 0.5:
        return 0.5 + 0.5 * wave
    return np.clip(0.5 + 2.0 * wave, 0.0, 1.0)  # square-ish, slightly soft edges


def _checkerboard(rng):
    s = rng.uniform(4, 16)
    oy, ox = rng.uniform(0, 2 * s, 2)
    return (np.mod(np.floor((_R + oy) / s) + np.floor((_C + ox) / s), 2)).astype(np.float64)


def _dots(rng):
    spacing = rng.uniform(8, 18)
    radius = rng.uniform(1.5, spacing * 0.33)
    if rng.rand() < 0.5:  # jittered grid
        oy, ox = rng.uniform(0, spacing, 2)
        g = np.arange(-1, SIZE / spacing + 2) * spacing
        cy, cx = np.meshgrid(g + oy, g + ox, indexing="ij")
        cy = cy.ravel() + rng.uniform(-0.15, 0.15, cy.size) * spacing
        cx = cx.ravel() + rng.uniform(-0.15, 0.15, cx.size) * spacing
    else:  # random scatter with about the same density
        n = int((SIZE / spacing) ** 2) + 2
        cy, cx = rng.uniform(-radius, SIZE + radius, (2, n))
    d2 = (_R[..., None] - cy) ** 2 + (_C[..., None] - cx) ** 2
    dist = np.sqrt(d2.min(axis=-1))
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def make_image(rng, label: int) -> np.ndarray:
    """One [64, 64, 3] float image in [0, 1] of class CLASSES[label]."""
    name = CLASSES[label]
    if name in HUES:
        img = _colour_image(rng, HUES[name])
    else:
        if name in ANGLES:
            pattern = _stripes(rng, ANGLES[name])
        elif name == "checkerboard":
            pattern = _checkerboard(rng)
        else:
            pattern = _dots(rng)
        bg, fg = _pair(rng)
        img = bg + (fg - bg) * pattern[..., None]
    img = img + rng.normal(0, rng.uniform(0.0, 0.04), img.shape)
    return np.clip(img, 0.0, 1.0)


def generate(n_per_class: int, seed: int) -> Tuple[Tensor, Tensor]:
    """n_per_class images of each class, shuffled: (float32 [N, 3, 64, 64] in [0, 1], int64 [N])."""
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    rng.shuffle(labels)
    images = np.stack([make_image(rng, int(l)) for l in labels]).astype(np.float32)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


class DemoNet(nn.Module):
    """conv1 3->16 ReLU pool2, conv2 16->32 ReLU pool2, conv3 32->32 ReLU, global mean, fc 32->10.
    Takes RGB in [0, 1]; normalisation (x - 0.5) / 0.25 is inside."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, len(CLASSES))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = (x - 0.5) / 0.25
        a1 = F.relu(self.conv1(x))
        a2 = F.relu(self.conv2(F.max_pool2d(a1, 2)))
        a3 = F.relu(self.conv3(F.max_pool2d(a2, 2)))
        logits = self.fc(a3.mean(dim=(2, 3)))
        return {"conv1": a1, "conv2": a2, "conv3": a3, "logits": logits}

    @torch.jit.export
    def tap(self, x: Tensor, layer: str) -> Tensor:
        """One layer's activation, computing the network only up to it (loupe uses this
        when a model has it, so rendering conv1 does not pay for conv2 and conv3)."""
        x = (x - 0.5) / 0.25
        a1 = F.relu(self.conv1(x))
        if layer == "conv1":
            return a1
        a2 = F.relu(self.conv2(F.max_pool2d(a1, 2)))
        if layer == "conv2":
            return a2
        a3 = F.relu(self.conv3(F.max_pool2d(a2, 2)))
        if layer == "conv3":
            return a3
        if layer == "logits":
            return self.fc(a3.mean(dim=(2, 3)))
        raise RuntimeError("unknown layer " + layer)


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Light photometric jitter (brightness, contrast, noise), random 180-degree rotations and
    circular shifts: all keep each class's meaning (mirror flips would swap stripes_45/135)."""
    n = x.shape[0]
    scale = torch.empty(n, 1, 1, 1).uniform_(0.75, 1.25, generator=g)
    shift = torch.empty(n, 1, 1, 1).uniform_(-0.1, 0.1, generator=g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * scale + mean + shift
    x = x + torch.randn(x.shape, generator=g) * 0.02
    rot = torch.rand(n, generator=g) < 0.5
    x = torch.where(rot.view(n, 1, 1, 1), x.flip(2, 3), x)
    dy, dx = torch.randint(0, SIZE, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.clamp(0, 1)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 500])["logits"].argmax(1) for i in range(0, len(images), 500)])
    return (pred == labels).float().mean().item()


def train(epochs: int = 6, n_per_class: int = 500) -> Tuple[DemoNet, float]:
    torch.manual_seed(TORCH_SEED)
    model = DemoNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (n_per_class * len(CLASSES)) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(TORCH_SEED)
    held_x, held_y = generate(100, HELD_OUT_SEED)
    t0 = time.time()
    for epoch in range(epochs):
        # Fresh images every epoch: the generator is cheap and there is no overfitting to chase.
        xs, ys = generate(n_per_class, TRAIN_SEED * 1000 + epoch)
        perm = torch.randperm(len(xs), generator=g)
        model.train()
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * 64:(i + 1) * 64]
            logits = model(augment(xs[idx], g))["logits"]
            loss = F.cross_entropy(logits, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        model.eval()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}, "
              f"held-out accuracy {accuracy(model, held_x, held_y):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return model, accuracy(model, held_x, held_y)


def main() -> int:
    p = argparse.ArgumentParser(description="Train and export loupe's demo model (deterministic).")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models", "demo", "demo.pt"))
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)  # determinism (and it is small enough)
    torch.use_deterministic_algorithms(True)

    model, acc = train(args.epochs)
    print(f"held-out accuracy: {acc:.4f}")
    if acc < 0.95:
        print("warning: held-out accuracy below 0.95", file=sys.stderr)

    model.eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    scripted = torch.jit.script(model)
    out = os.path.normpath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.jit.save(scripted, out)
    sidecar = {
        "name": "loupe-demo",
        "input_size": SIZE,
        "layers": ["conv1", "conv2", "conv3", "logits"],
        "classes": CLASSES,
        "preprocessing": "RGB in [0,1], then (x - 0.5) / 0.25 inside the model",
        "source": "tools/make_demo_model.py (synthetic colours, stripes, checkerboards, dots)",
        "held_out_accuracy": round(acc, 4),
    }
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    print(f"wrote {out} ({os.path.getsize(out)} bytes) and {os.path.splitext(out)[0] + '.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
