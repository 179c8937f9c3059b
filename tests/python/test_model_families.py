"""One small model of each family through tools/export.py, `loupe inspect` and `loupe render`.

    .venv/bin/python -m pytest tests/python/test_model_families.py -q
    LOUPE=/path/to/loupe .venv/bin/python -m pytest ...   # another build of loupe

timm's tiny test models (`timm.list_models('test_*')`), a Swin shrunk to 64 px and the
ViT-S-32 image tower of open_clip, all with random weights (nothing is downloaded). Each
case names layers of a different output layout (docs/models.md "Output shapes"): feature
maps channels-first and channels-last, token sequences with a class token, a register
token or no prefix token, a transformer's MLP hidden neurons, and vectors. Each is exported,
its layouts and shapes checked against the sidecar and `loupe inspect`, and a few units of
each layer are rendered on the CPU (4 steps at 32 px: the pipeline, not the pictures).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPORT = ROOT / "tools" / "export.py"
LOUPE = Path(os.environ.get("LOUPE", ROOT / "target" / "release" / "loupe"))

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A Swin small enough for the CPU: one block per stage, 64 px inputs, 2x2 windows. Its
# stages return channels-last maps [N, H, W, C]; its MLPs work on [N, H*W, C] tokens.
SMALL_SWIN = textwrap.dedent("""
    import timm
    import torch

    def build():
        torch.manual_seed(0)
        return timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=32,
                                 num_heads=(1, 1, 1, 1), img_size=64, window_size=2)
""")

# (id, --model, {layer: layout in the sidecar}, extra export arguments)
CASES = [
    ("resnet", "timm:test_resnet", {"layer2.0": "nchw", "fc": "vector"}, []),
    ("convnext", "timm:test_convnext", {"stages.1": "nchw", "stages.1.blocks.0.mlp.act": "nhwc"}, []),
    ("efficientnet", "timm:test_efficientnet", {"blocks.2.0": "nchw", "classifier": "vector"}, []),
    ("maxvit", "timm:test_maxvit", {"stages.1": "nchw", "head": "vector"}, []),
    ("vit", "timm:test_vit", {"blocks.1": "tokens(prefix=1, grid=10x10)",
                              "blocks.1.mlp.act": "tokens(prefix=1, grid=10x10)"}, []),
    # One register token and no class token.
    ("vit-register", "timm:test_vit2", {"blocks.0": "tokens(prefix=1, grid=10x10)"}, []),
    # No prefix token at all.
    ("vit-relpos", "timm:test_vit_relpos", {"blocks.0": "tokens(prefix=0, grid=10x10)"}, []),
    ("swin", "small_swin:build", {"layers.1": "nhwc", "layers.1.blocks.0.mlp.act": "tokens(prefix=0, grid=8x8)"},
     ["--input-size", "64", "--preprocess", "imagenet"]),
    ("open_clip", "open_clip:ViT-S-32", {"transformer.resblocks.1": "tokens(prefix=1, grid=7x7)",
                                         "transformer.resblocks.1.mlp.gelu": "tokens(prefix=1, grid=7x7)"}, []),
]


def inspect(model: Path):
    """{layer: shape} as `loupe inspect` prints them."""
    r = subprocess.run([str(LOUPE), "inspect", "--model", str(model)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    found = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)\s+\[([\d, ]+)\]$", line.strip())
        if m:
            found[m.group(1)] = [int(d) for d in m.group(3).split(",")]
    return found


@pytest.mark.parametrize("model,layouts,extra", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_family_exports_and_renders(tmp_path, model, layouts, extra):
    if not LOUPE.exists():
        pytest.fail(f"{LOUPE} is missing: build it first (make build)")
    (tmp_path / "small_swin.py").write_text(SMALL_SWIN)
    out = tmp_path / "model.pt"
    r = subprocess.run([sys.executable, str(EXPORT), "--model", model, "--layers", ",".join(layouts),
                        "--out", str(out), *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "falling back" not in r.stderr, r.stderr  # scripted, with tap
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["layouts"] == layouts
    for name, layout in layouts.items():
        grid = re.search(r"grid=(\d+)x(\d+)", layout)
        if grid:
            assert sidecar["shapes"][name][1:] == [int(grid.group(1)), int(grid.group(2))]
        assert len(sidecar["shapes"][name]) == (1 if layout == "vector" else 3)
    assert inspect(out) == sidecar["shapes"]

    atlas = tmp_path / "atlas"
    r = subprocess.run([str(LOUPE), "render", "--model", str(out), "--out", str(atlas), "--device", "cpu",
                        "--size", "32", "--steps", "4", "--techniques", "channel", "--units", "0..2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for name in layouts:
        for unit in (0, 1):
            assert (atlas / "layers" / name / "units" / str(unit) / "channel.png").is_file(), (name, unit)
