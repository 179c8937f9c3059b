"""Connections (docs/atlas-format.md "Connections") on a model whose wiring the test knows.

The model is built here with hand-set weights and exported as TorchScript:
  a = relu(conv3x3(x) + 0.1), 4 units, positive weights: every unit is active everywhere;
  b = conv1x1(a): b0 = a0 + a1 (the sum of two units below), b1 = a3 - a2 (excited by a3,
      inhibited by a2);
  c = relu(b) (a nonlinearity): c0 depends on b0 alone, c1 on b1 alone.
`loupe render` runs it over 60 random images (four map batches of 16: every batch must
count); the connections must name exactly those units, with those signs, and through a
linear path equal the weight times the unit's mean activation (a's `spatial_mean.mean`
in examples.json, which every batch feeds).
"""

import json
import subprocess
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
LOUPE = ROOT / "target" / "release" / "loupe"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Wired(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.linspace(0.05, 0.3, 4 * 3 * 9).reshape(4, 3, 3, 3))
            self.a.bias.fill_(0.1)
            self.b.weight.zero_()
            self.b.weight[0, 0] = 1.0
            self.b.weight[0, 1] = 1.0
            self.b.weight[1, 3] = 1.0
            self.b.weight[1, 2] = -1.0

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        a = F.relu(self.a(x))
        b = self.b(a)
        return {"a": a, "b": b, "c": F.relu(b)}


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    if not LOUPE.exists():
        pytest.fail(f"{LOUPE} is missing: build it first (make build)")
    tmp = tmp_path_factory.mktemp("wired")
    model = torch.jit.script(Wired().eval())
    torch.jit.save(model, str(tmp / "wired.pt"))
    (tmp / "wired.json").write_text(json.dumps({"name": "wired", "input_size": 16}))
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "images" / f"{i:02d}.png")
    out = tmp / "atlas"
    cmd = [
        str(LOUPE), "render", "--model", str(tmp / "wired.pt"), "--out", str(out),
        # Named out of the model's order: connections follow the model's.
        "--layers", "c,a,b", "--techniques", "channel", "--steps", "2", "--size", "16", "--device", "cpu",
        "--dataset", str(tmp / "images"), "--examples", "2",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"loupe render failed:\n{r.stdout}\n{r.stderr}"
    return out


def table(atlas, layer):
    rows = pq.read_table(atlas / "layers" / layer / "connections.parquet").to_pylist()
    assert all(r["layer"] == layer for r in rows)
    return rows


def nonzero(rows, unit, other_layer):
    return {r["other_unit"]: r["score"] for r in rows if r["unit"] == unit and r["other_layer"] == other_layer and r["score"] != 0}


def examples(atlas, layer):
    return {u["unit"]: u for u in json.loads((atlas / "layers" / layer / "examples.json").read_text())["units"]}


def test_the_sum_and_the_inhibition_are_found_with_their_signs(atlas):
    b = table(atlas, "b")
    sum_unit, inhibited = nonzero(b, 0, "a"), nonzero(b, 1, "a")
    assert set(sum_unit) == {0, 1} and all(s > 0 for s in sum_unit.values()), sum_unit
    assert set(inhibited) == {2, 3}, inhibited
    assert inhibited[2] < 0 < inhibited[3], inhibited


def test_a_linear_path_scores_the_weight_times_the_mean_activation(atlas):
    a, b = examples(atlas, "a"), table(atlas, "b")
    score = {(r["unit"], r["other_unit"]): r["score"] for r in b if r["other_layer"] == "a"}
    for (unit, other), weight in {(0, 0): 1.0, (0, 1): 1.0, (1, 2): -1.0, (1, 3): 1.0}.items():
        assert score[(unit, other)] == pytest.approx(weight * a[other]["spatial_mean"]["mean"], rel=1e-5)


def test_outputs_mirror_inputs_and_the_summary_lists_them(atlas):
    a = table(atlas, "a")
    assert nonzero(a, 2, "b").keys() == {1} and nonzero(a, 2, "b")[1] < 0
    assert nonzero(a, 0, "b").keys() == {0}
    # The first layer has no inputs; every row of a is an output into b.
    assert {r["other_layer"] for r in a} == {"b"} and len(a) == 4 * 2
    summary = examples(atlas, "b")
    assert [(c["layer"], c["unit"]) for c in summary[0]["inputs"]] in ([("a", 0), ("a", 1)], [("a", 1), ("a", 0)])
    assert {c["unit"]: c["score"] < 0 for c in summary[1]["inputs"]} == {2: True, 3: False}
    assert examples(atlas, "a")[2]["outputs"] == [{"layer": "b", "unit": 1, "score": nonzero(a, 2, "b")[1]}]


def test_through_a_nonlinearity_each_unit_depends_on_its_own_input_only(atlas):
    c = table(atlas, "c")
    assert nonzero(c, 0, "b").keys() == {0} and nonzero(c, 0, "b")[0] > 0
    assert set(nonzero(c, 1, "b")) <= {1} and all(s > 0 for s in nonzero(c, 1, "b").values())
    # c is the last layer: inputs only.
    assert {r["other_layer"] for r in c} == {"b"}
