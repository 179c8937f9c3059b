"""Tests for tools/export.py, the committed demo model and the Rust test fixtures.

    .venv/bin/python -m pytest tests/python -q

Everything uses random weights (no downloads). The lucent test runs only where lucent is
importable.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXPORT = ROOT / "tools" / "export.py"
DEMO = ROOT / "models" / "demo" / "demo.pt"
FIXTURES = ROOT / "tests" / "fixtures"

# TorchScript is what loupe (libtorch through tch) loads; torch 2.11 marks the Python API deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_export(*args, cwd=None):
    return subprocess.run([sys.executable, str(EXPORT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def export_ok(tmp_path, model, layers, name="m.pt", extra=(), cwd=None):
    out = tmp_path / name
    r = run_export("--model", model, "--layers", layers, "--out", str(out), *extra, cwd=cwd)
    assert r.returncode == 0, r.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    return torch.jit.load(str(out)), sidecar


def shapes(outputs):
    return {k: list(v.shape) for k, v in outputs.items()}


@pytest.fixture(scope="module")
def googlenet(tmp_path_factory):
    return export_ok(tmp_path_factory.mktemp("googlenet"), "torchvision:googlenet", "inception4a,fc", "googlenet.pt")


def test_googlenet_export(googlenet):
    model, sidecar = googlenet
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, dict)
    assert list(out) == ["inception4a", "fc"]
    assert shapes(out) == {"inception4a": [1, 512, 14, 14], "fc": [1, 1000]}
    assert sidecar["input_size"] == 224
    assert sidecar["name"] == "googlenet"
    assert sidecar["layers"] == ["inception4a", "fc"]
    assert "imagenet" in sidecar["preprocessing"]
    assert sidecar["source"].startswith("torchvision:googlenet")
    assert not any(p.requires_grad for p in model.parameters())
    # tap computes one layer, the same values as forward
    with torch.no_grad():
        assert torch.allclose(model.tap(x, "inception4a"), out["inception4a"], atol=1e-6)
    # gradients reach the input (what feature visualisation needs)
    x.requires_grad_(True)
    model(x)["fc"][0, 1].backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_resnet50_export(tmp_path):
    model, sidecar = export_ok(tmp_path, "torchvision:resnet50", "layer3.5,fc")
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert list(out) == ["layer3.5", "fc"]
    assert shapes(out) == {"layer3.5": [1, 1024, 14, 14], "fc": [1, 1000]}
    assert sidecar["input_size"] == 224


def test_vit_export_tokens_become_grid(tmp_path):
    layer = "encoder.layers.encoder_layer_2"
    model, sidecar = export_ok(tmp_path, "torchvision:vit_b_16", layer)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert list(out) == [layer]
    assert shapes(out) == {layer: [1, 768, 14, 14]}
    assert sidecar["input_size"] == 224
    assert sidecar["shapes"] == {layer: [768, 14, 14]}
    # Only the blocks up to the layer are kept (3 of 12 encoder blocks, ~22M of 86M parameters).
    assert sum(p.numel() for p in model.parameters()) < 30_000_000


def test_unknown_layer_is_an_error(tmp_path):
    r = run_export("--model", "torchvision:googlenet", "--layers", "inception4a,inception9z", "--out", str(tmp_path / "x.pt"))
    assert r.returncode != 0
    assert "inception9z" in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_list_layers():
    r = run_export("--model", "torchvision:googlenet", "--list-layers")
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    defaults = [line.split()[0] for line in r.stdout.splitlines() if line.endswith(" *")]
    assert "inception4a" in names and "inception4a.branch1.conv" in names
    assert defaults == ["conv1", "conv2", "conv3", "inception3a", "inception3b", "inception4a", "inception4b",
                        "inception4c", "inception4d", "inception4e", "inception5a", "inception5b", "fc"]


def test_custom_module_callable(tmp_path):
    (tmp_path / "my_net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Tokens(nn.Module):
            # A 3-D output with 1 + 4*4 tokens: becomes [N, 6, 4, 4].
            def __init__(self):
                super().__init__()
                self.embed = nn.Conv2d(3, 6, 8, stride=8)
                self.cls = nn.Parameter(torch.zeros(1, 1, 6))
                self.mix = nn.Linear(6, 6)
            def forward(self, x):
                t = self.embed(x).flatten(2).transpose(1, 2)
                t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
                return self.mix(t)

        def build():
            torch.manual_seed(0)
            return Tokens()
    """))
    # run from tmp_path so that my_net is importable
    model, sidecar = export_ok(tmp_path, "my_net:build", "embed,mix", extra=("--input-size", "32"), cwd=tmp_path)
    out = model(torch.rand(2, 3, 32, 32))
    assert shapes(out) == {"embed": [2, 6, 4, 4], "mix": [2, 6, 4, 4]}
    assert sidecar["input_size"] == 32 and sidecar["preprocessing"].startswith("none")


def test_custom_bad_token_count(tmp_path):
    (tmp_path / "bad_net.py").write_text(textwrap.dedent("""
        from torch import nn
        class Bad(nn.Module):
            def __init__(self):
                super().__init__()
                self.mix = nn.Linear(3, 3)
            def forward(self, x):
                return self.mix(x.flatten(2).transpose(1, 2)[:, :7])
    """))
    r = run_export("--model", "bad_net:Bad", "--out", str(tmp_path / "bad.pt"), "--input-size", "8", cwd=tmp_path)
    assert r.returncode != 0
    assert "layer 'mix'" in r.stderr and "not tokens" in r.stderr


def test_layer_names_are_module_names(tmp_path):
    """Sibling modules dense6_1, dense6_2 and dense6_3 (widths 2, 4, 10) each export their
    own output. torchvision's feature-extraction node names drop a `_N` suffix they take
    for a repeated call, so `onet.dense6_1` once named the node of `dense6_2`."""
    (tmp_path / "onet_net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class ONet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, stride=2)
                self.dense5 = nn.Linear(8, 16)
                self.dense6_1 = nn.Linear(16, 2)
                self.dense6_2 = nn.Linear(16, 4)
                self.dense6_3 = nn.Linear(16, 10)
            def forward(self, x):
                h = self.dense5(self.conv(x).mean((2, 3)))
                return self.dense6_1(h), self.dense6_2(h), self.dense6_3(h)

        class Outer(nn.Module):
            def __init__(self):
                super().__init__()
                self.onet = ONet()
            def forward(self, x):
                return self.onet(x)

        def build():
            torch.manual_seed(0)
            return Outer()
    """))
    heads = ["onet.dense6_1", "onet.dense6_2", "onet.dense6_3"]
    r = run_export("--model", "onet_net:build", "--list-layers", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(heads) <= {line.split()[0] for line in r.stdout.splitlines()}
    model, sidecar = export_ok(tmp_path, "onet_net:build", ",".join(heads), extra=("--input-size", "16"), cwd=tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import onet_net
    finally:
        sys.path.remove(str(tmp_path))
    eager = onet_net.build().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out, want = model(x), eager(x)
    assert shapes(out) == {"onet.dense6_1": [2, 2], "onet.dense6_2": [2, 4], "onet.dense6_3": [2, 10]}
    for name, expected in zip(heads, want):
        assert torch.allclose(out[name], expected, atol=1e-6), name
    assert sidecar["layouts"] == {name: "vector" for name in heads}


def test_layer_that_is_not_its_module_is_refused(tmp_path):
    """torch.fx freezes Python values at trace time. A module whose output depends on Python
    state (here a call counter) gives a graph that no longer computes the module's output;
    export checks every layer against the eager module's output (a forward hook) and
    refuses that layer by name rather than export something else under it."""
    (tmp_path / "stateful_net.py").write_text(textwrap.dedent("""
        from torch import nn

        class Counting(nn.Module):
            def __init__(self):
                super().__init__()
                self.calls = 0
            def forward(self, x):
                self.calls += 1
                return x * self.calls

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, padding=1)
                self.counting = Counting()
            def forward(self, x):
                return self.counting(self.conv(x))
    """))
    r = run_export("--model", "stateful_net:Net", "--layers", "conv,counting", "--input-size", "8",
                   "--out", str(tmp_path / "stateful.pt"), cwd=tmp_path)
    assert r.returncode != 0
    assert "layer 'counting'" in r.stderr, r.stderr
    assert not (tmp_path / "stateful.pt").exists()


@pytest.mark.skipif(importlib.util.find_spec("lucent") is None, reason="lucent is not installed")
def test_lucent_inceptionv1(tmp_path):
    model, sidecar = export_ok(tmp_path, "lucent:inceptionv1", "mixed4a,softmax2_pre_activation_matmul")
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert shapes(out) == {"mixed4a": [1, 508, 14, 14], "softmax2_pre_activation_matmul": [1, 1008]}
    assert sidecar["input_size"] == 224 and "117" in sidecar["preprocessing"]


# --- the demo model -------------------------------------------------------------------------

def load_demo_generator():
    spec = importlib.util.spec_from_file_location("make_demo_model", ROOT / "tools" / "make_demo_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_model_contract():
    model = torch.jit.load(str(DEMO))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert list(out) == ["conv1", "conv2", "conv3", "logits"]
    assert shapes(out) == {"conv1": [2, 16, 64, 64], "conv2": [2, 32, 32, 32], "conv3": [2, 32, 16, 16], "logits": [2, 10]}
    sidecar = json.loads(DEMO.with_suffix(".json").read_text())
    assert sidecar["input_size"] == 64 and sidecar["name"] == "loupe-demo"
    assert sidecar["classes"] == load_demo_generator().CLASSES
    assert DEMO.stat().st_size < 500_000


def test_demo_model_held_out_accuracy():
    gen = load_demo_generator()
    images, labels = gen.generate(40, seed=12345)  # a seed neither training nor its check used
    model = torch.jit.load(str(DEMO))
    with torch.no_grad():
        pred = model(images)["logits"].argmax(1)
    acc = (pred == labels).float().mean().item()
    assert acc > 0.9, acc


def test_demo_colour_logits_optimise_to_their_colour():
    """Gradient ascent on a colour logit from grey noise gives an image dominated by that colour."""
    model = torch.jit.load(str(DEMO))
    for cls, channel in [(0, 0), (1, 1), (2, 2)]:  # red, green, blue
        torch.manual_seed(cls)
        p = (torch.randn(1, 3, 64, 64) * 0.1).requires_grad_(True)
        opt = torch.optim.Adam([p], lr=0.05)
        for _ in range(100):
            loss = -model(torch.sigmoid(p))["logits"][0, cls]
            opt.zero_grad()
            loss.backward()
            opt.step()
        means = torch.sigmoid(p).detach().mean(dim=(0, 2, 3))
        others = [means[c] for c in range(3) if c != channel]
        assert means[channel] > max(others) + 0.2, (cls, means.tolist())


# --- fixtures for the Rust tests ------------------------------------------------------------

def test_fixtures():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(Exception):
        torch.jit.load(str(FIXTURES / "not_torchscript.pt"))
    assert torch.jit.load(str(FIXTURES / "not_dict.pt"))(x).shape == (1, 4, 8, 8)
    tiny = torch.jit.load(str(FIXTURES / "tiny.pt"))(x)
    assert shapes(tiny) == {"conv": [1, 4, 16, 16], "logits": [1, 3]}
    assert json.loads((FIXTURES / "tiny.json").read_text())["input_size"] == 16
    evil = torch.jit.load(str(FIXTURES / "evil_names.pt"))(x)
    assert list(evil) == ["../escape", "/abs/path", "..", "a/b"]
    assert all(list(v.shape) == [1, 2, 4, 4] for v in evil.values())
    assert json.loads((FIXTURES / "evil_names.json").read_text())["input_size"] == 16
