#!/usr/bin/env python3
"""Write the tiny model fixtures the Rust tests use into tests/fixtures/ (deterministic).

    python tools/make_test_models.py [--out tests/fixtures]

  not_torchscript.pt         a plain torch.save of a state dict: not loadable as TorchScript
  not_dict.pt                valid TorchScript whose forward returns a Tensor [N,4,8,8], not a dict
  tiny.pt + tiny.json        a contract model (input_size 16): "conv" [N,4,16,16] (3->4 conv 3x3
                             pad 1 + ReLU) and "logits" [N,3] (linear head on the mean-pooled conv)
  gray.pt + gray.json        a 1-channel contract model (input_size 16): "conv" [N,4,16,16] (1->4 conv
                             3x3 pad 1 + ReLU) and "logits" [N,3], for grayscale renders
  diverges.pt + .json        a contract model (input_size 16): "conv" [N,4,16,16] like tiny's, except
                             that channel 2 turns NaN wherever it exceeds its value on grey + 0.05,
                             so an optimisation of unit 2 diverges after a few steps
  evil_names.pt + .json      a contract model (input_size 16) whose layer names are hostile as
                             path segments: "../escape", "/abs/path", "..", "a/b", each [N,2,4,4]
"""

import argparse
import json
import os
import sys
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NotDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.conv(x), 8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        a = F.relu(self.conv(x))
        return {"conv": a, "logits": self.head(a.mean(dim=(2, 3)))}


class Gray(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        a = F.relu(self.conv(x))
        return {"conv": a, "logits": self.head(a.mean(dim=(2, 3)))}


class Diverges(nn.Module):
    """Channel 2 is NaN where it exceeds `limit`; its backward stays finite (`where`
    passes no gradient to the NaN), so the other channels' images do not change."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            grey = F.relu(self.conv(torch.full((1, 3, 16, 16), 0.5)))
        self.limit: float = float(grey[0, 2].max()) + 0.05

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        a = F.relu(self.conv(x))
        c = a[:, 2:3]
        c = torch.where(c > self.limit, torch.full_like(c, float("nan")), c)
        return {"conv": torch.cat([a[:, :2], c, a[:, 3:]], dim=1)}


class EvilNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 2, 3, padding=1) for _ in range(4)])

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = F.adaptive_avg_pool2d(x, 4)
        out: Dict[str, Tensor] = {}
        names = ["../escape", "/abs/path", "..", "a/b"]
        for i, conv in enumerate(self.convs):
            out[names[i]] = F.relu(conv(x))
        return out


def _script(model: nn.Module):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.jit.script(model)


def _sidecar(path: str, **fields) -> None:
    with open(path, "w") as f:
        json.dump(fields, f, indent=2)
        f.write("\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    out = os.path.normpath(p.parse_args().out)
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(0)
    torch.save({"weight": torch.randn(4, 3)}, os.path.join(out, "not_torchscript.pt"))

    torch.manual_seed(1)
    torch.jit.save(_script(NotDict()), os.path.join(out, "not_dict.pt"))

    torch.manual_seed(2)
    torch.jit.save(_script(Tiny()), os.path.join(out, "tiny.pt"))
    _sidecar(os.path.join(out, "tiny.json"), name="tiny", input_size=16, layers=["conv", "logits"],
             preprocessing="none", source="tools/make_test_models.py")

    torch.manual_seed(3)
    torch.jit.save(_script(EvilNames()), os.path.join(out, "evil_names.pt"))
    _sidecar(os.path.join(out, "evil_names.json"), name="evil-names", input_size=16,
             layers=["../escape", "/abs/path", "..", "a/b"], preprocessing="none",
             source="tools/make_test_models.py")

    torch.manual_seed(4)
    torch.jit.save(_script(Gray()), os.path.join(out, "gray.pt"))
    _sidecar(os.path.join(out, "gray.json"), name="gray", input_size=16, layers=["conv", "logits"],
             preprocessing="none", channels=1, source="tools/make_test_models.py")

    torch.manual_seed(5)
    torch.jit.save(_script(Diverges()), os.path.join(out, "diverges.pt"))
    _sidecar(os.path.join(out, "diverges.json"), name="diverges", input_size=16, layers=["conv"],
             preprocessing="none", source="tools/make_test_models.py")

    # Self-check.
    x = torch.rand(2, 3, 16, 16)
    assert torch.jit.load(os.path.join(out, "not_dict.pt"))(x).shape == (2, 4, 8, 8)
    tiny = torch.jit.load(os.path.join(out, "tiny.pt"))(x)
    assert list(tiny) == ["conv", "logits"] and tiny["conv"].shape == (2, 4, 16, 16) and tiny["logits"].shape == (2, 3)
    gray = torch.jit.load(os.path.join(out, "gray.pt"))(torch.rand(2, 1, 16, 16))
    assert gray["conv"].shape == (2, 4, 16, 16) and gray["logits"].shape == (2, 3)
    diverges = torch.jit.load(os.path.join(out, "diverges.pt"))
    assert not diverges(torch.full((1, 3, 16, 16), 0.5))["conv"].isnan().any()
    assert diverges(torch.ones(1, 3, 16, 16) * 8)["conv"][:, 2].isnan().any()
    evil = torch.jit.load(os.path.join(out, "evil_names.pt"))(x)
    assert list(evil) == ["../escape", "/abs/path", "..", "a/b"] and all(v.shape == (2, 2, 4, 4) for v in evil.values())
    try:
        torch.jit.load(os.path.join(out, "not_torchscript.pt"))
    except Exception:
        pass
    else:
        raise AssertionError("not_torchscript.pt loaded as TorchScript")
    for name in sorted(os.listdir(out)):
        print(f"{os.path.join(out, name)}\t{os.path.getsize(os.path.join(out, name))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
