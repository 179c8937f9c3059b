"""The static atlas viewer (viewer/) in headless Chromium, over the DevTools protocol.

The atlas is rendered by `target/release/loupe render` (the demo model, a small dataset,
few steps) into a temporary directory, and a few of its units are labelled with `loupe
label`; the viewer's three files are copied to its root unless something (loupe itself)
already put them there. The dataset pass gives each unit its connections and the index
its trust indicators. A partial copy stands for an atlas still being written: conv1
without layer.json and with some images gone, conv2 with a layer.json that lists fewer
units than atlas.json.

A second atlas, rendered from a job file, has the newer techniques: diversity (four
images per unit) and snapshots on conv1 and conv3, and conv3's DeepDream, caricature and
direction items; it has no labels, so labels.json is asked for and not found.

The server: $LOUPE_VIEWER_SERVE, a command template with `{dir}` and `{port}`, e.g.
    LOUPE_VIEWER_SERVE='target/release/loupe serve {dir} --listen 127.0.0.1:{port}'
run from the repository root; unset, `python3 -m http.server {port} --bind 127.0.0.1
--directory {dir}`. Chromium: `chromium` on PATH or $CHROMIUM.

    .venv/bin/pytest -q tests/browser
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cdp  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LOUPE = ROOT / "target" / "release" / "loupe"
VIEWER = ROOT / "viewer"
VIEWER_FILES = ("index.html", "viewer.js", "viewer.css")
LAYERS = ["conv1", "conv2", "conv3", "logits"]
TECHNIQUES = ["channel", "neuron", "negative"]

# Researchers' labels of the main atlas: (layer, unit) -> text, written with `loupe label`.
LABELS = {
    ("conv1", 3): "red edge",
    ("conv2", 5): "curve detector",
    ("conv2", 7): "Red blobs",
    ("conv3", 12): "curved stripes",
}

# The partial atlas: what is taken away (see make_partial).
CONV1_GONE = {"channel": {3, 7}, "neuron": {3}, "negative": {3}}
CONV2_UNLISTED_GONE = 5  # neither in layer.json nor on disk
CONV2_UNLISTED_THERE = 9  # not in layer.json, but its files are there


def install_viewer(atlas: Path) -> None:
    """Copies viewer/ to the atlas root, keeping files that are already there (loupe
    writes its embedded copy when a job starts). One that differs from viewer/ came from
    a loupe built before viewer/ last changed: the test would check an old viewer."""
    for name in VIEWER_FILES:
        dst = atlas / name
        if not dst.exists():
            shutil.copyfile(VIEWER / name, dst)
        elif dst.read_bytes() != (VIEWER / name).read_bytes():
            pytest.fail(f"{dst} (written by {LOUPE}) differs from viewer/{name}: rebuild loupe")


def render_atlas(out: Path) -> None:
    if not LOUPE.exists():
        pytest.fail(f"{LOUPE} is missing: build it first (make build)")
    cmd = [
        str(LOUPE), "render",
        "--model", str(ROOT / "models" / "demo" / "demo.pt"),
        "--out", str(out),
        "--techniques", ",".join(TECHNIQUES),
        "--steps", "8", "--size", "32", "--device", "cpu",
        "--dataset", str(ROOT / "tests" / "fixtures" / "dataset" / "images"),
        "--examples", "4",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"loupe render failed:\n{r.stdout}\n{r.stderr}"
    assert (out / "atlas.json").exists()


def label_atlas(atlas: Path) -> None:
    for (layer, unit), text in LABELS.items():
        r = subprocess.run([str(LOUPE), "label", str(atlas), layer, str(unit), text], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"loupe label failed:\n{r.stdout}\n{r.stderr}"
    assert (atlas / "labels.json").exists()


def make_partial(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    conv1 = dst / "layers" / "conv1"
    (conv1 / "layer.json").unlink()
    for technique, units in CONV1_GONE.items():
        for u in units:
            for ext in ("png", "json"):
                (conv1 / "units" / str(u) / f"{technique}.{ext}").unlink()
    conv2 = dst / "layers" / "conv2"
    layer = json.loads((conv2 / "layer.json").read_text())
    layer["units"] = [u for u in layer["units"] if u["unit"] not in (CONV2_UNLISTED_GONE, CONV2_UNLISTED_THERE)]
    (conv2 / "layer.json").write_text(json.dumps(layer))
    for technique in TECHNIQUES:
        for ext in ("png", "json"):
            (conv2 / "units" / str(CONV2_UNLISTED_GONE) / f"{technique}.{ext}").unlink()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def atlas_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viewer") / "atlas"
    render_atlas(out)
    label_atlas(out)
    install_viewer(out)
    return out


@pytest.fixture(scope="session")
def partial_dir(atlas_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viewer") / "partial"
    make_partial(atlas_dir, out)
    return out


@pytest.fixture(scope="session")
def site(atlas_dir):
    with cdp.serve(atlas_dir, cwd=ROOT) as base:
        yield base


@pytest.fixture(scope="session")
def partial_site(partial_dir):
    with cdp.serve(partial_dir, cwd=ROOT) as base:
        yield base


@pytest.fixture(scope="session")
def browser():
    if not cdp.find_chromium():
        pytest.skip("no Chromium (apt-get install -y chromium, or set $CHROMIUM)")
    with cdp.Browser.launch() as b:
        yield b


def check_page(page, base: str, allow_missing: bool) -> None:
    """What every view must keep: no script errors, nothing fetched outside the atlas,
    and (on a complete atlas) nothing asked for that is not there."""
    page.browser.pump(0.2)
    assert page.exceptions == [], f"uncaught exceptions: {page.exceptions}"
    assert page.console_errors == [], f"console errors: {page.console_errors}"
    origin = urlsplit(base)
    outside = [
        u for u in page.requests
        if not u.startswith("data:") and (urlsplit(u).scheme, urlsplit(u).netloc) != (origin.scheme, origin.netloc)
    ]  # fmt: skip
    assert outside == [], f"requests outside the atlas: {outside}"
    if not allow_missing:
        assert page.failed == [], f"requests that failed on a complete atlas: {page.failed}"


@contextlib.contextmanager
def new_page(browser):
    """A fresh 1280x800 tab, closed afterwards whatever happens."""
    page = browser.new_page(width=1280, height=800)
    try:
        yield page
    finally:
        browser.send("Target.closeTarget", {"targetId": page.target})
        browser.pages.remove(page)


@pytest.fixture
def page(browser, site):
    with new_page(browser) as p:
        yield p
        check_page(p, site, allow_missing=False)


@pytest.fixture
def partial_page(browser, partial_site):
    with new_page(browser) as p:
        yield p
        check_page(p, partial_site, allow_missing=True)


# ------------------------------------------------------------------ helpers


def open_view(page, url: str, view: str) -> None:
    """Loads the page afresh at `url` (by way of about:blank: a URL that differs only in
    its hash would not reload) and waits for the view."""
    page.goto("about:blank")
    page.goto(url)
    wait_view(page, view)


def wait_view(page, view: str) -> None:
    """Waits until the viewer has drawn `view` for the current hash (data-rendered): the
    hash changes at once, the view after its hashchange event and its fetches."""
    page.wait_for(
        f"document.body.dataset.ready === {json.dumps(view)} && document.body.dataset.rendered === location.hash"
    )


def scroll_through(page) -> None:
    """Scrolls to the bottom a screen at a time, so lazy images come into view."""
    y = 0
    while True:
        height = page.eval("document.documentElement.scrollHeight")
        view = page.eval("innerHeight")
        page.eval(f"window.scrollTo(0, {y})")
        page.browser.pump(0.1)
        if y + view >= height:
            break
        y += max(100, view // 2)


# Each grid card: unit, whether it is marked missing, its image's src, whether the image
# has finished and its natural width.
GRID_STATE = """[...document.querySelectorAll('#grid .unit')].map(li => {
  const img = li.querySelector('img');
  return { unit: Number(li.dataset.unit), missing: li.classList.contains('missing'),
           src: img ? img.getAttribute('src') : null, complete: img ? img.complete : null,
           width: img ? img.naturalWidth : 0 };
})"""
GRID_SETTLED = """[...document.querySelectorAll('#grid .unit')].every(li => {
  if (li.classList.contains('missing')) return true;
  const img = li.querySelector('img');
  return img && img.getAttribute('src') && img.complete && img.naturalWidth > 0;
})"""


def grid(page) -> list[dict]:
    return page.eval(GRID_STATE)


def settle_grid(page) -> list[dict]:
    scroll_through(page)
    page.wait_for(GRID_SETTLED)
    return grid(page)


def layer_json(atlas: Path, layer: str) -> dict:
    return json.loads((atlas / "layers" / layer / "layer.json").read_text())


# ------------------------------------------------------------------ the complete atlas


def test_atlas_page_lists_the_layers(page, site, atlas_dir):
    open_view(page, site, "atlas")  # the root URL: index.html, no hash
    atlas = json.loads((atlas_dir / "atlas.json").read_text())
    names = page.eval("[...document.querySelectorAll('.layer-name')].map(a => a.textContent)")
    hrefs = page.eval("[...document.querySelectorAll('.layer-name')].map(a => a.getAttribute('href'))")
    assert names == LAYERS
    assert hrefs == [f"#/layer/{name}" for name in LAYERS]
    text = page.eval("document.querySelector('main').innerText")
    assert page.eval("document.querySelector('h1').textContent") == atlas["model"]["name"]
    assert atlas["model"]["sha256"][:12] in text
    for technique in TECHNIQUES:
        assert technique in text
    assert "32 units" in text and "10 units" in text
    # Completeness, once every layer.json is in.
    page.wait_for("document.getElementById('completeness').textContent === 'complete'")
    statuses = page.eval("[...document.querySelectorAll('.layer .status')].map(s => s.textContent)")
    assert statuses == ["16 / 16", "32 / 32", "32 / 32", "10 / 10"]
    # The dataset summary.
    assert "24" in text and "4 top, 4 bottom" in text
    # The render settings, lucid's recipe.
    assert page.eval("document.querySelector('#param dd').textContent") == "fft"
    assert page.eval("document.querySelector('#transforms dd').textContent") == "pad 12 px, jitter 8 px, scale 0.9 to 1.1, rotate -10 to 10°, jitter 4 px"
    # A layer link opens the layer.
    page.eval("document.querySelector('.layer-name[href=\"#/layer/conv2\"]').click()")
    wait_view(page, "layer")
    assert page.eval("location.hash") == "#/layer/conv2"


def test_layer_page_loads_every_unit_image(page, site):
    # A small screen, so that the grid is longer than the screen and its bottom waits.
    page.resize(400, 300)
    open_view(page, site + "#/layer/conv3", "layer")
    cards = grid(page)
    assert [c["unit"] for c in cards] == list(range(32))
    assert not any(c["missing"] for c in cards)
    # Lazy: the last thumbnails have no src until they come near the screen.
    assert cards[-1]["src"] is None, "thumbnails far below the screen were loaded up front"
    assert page.eval("document.querySelector('#grid img').getAttribute('loading')") == "lazy"

    cards = settle_grid(page)
    for c in cards:
        assert c["src"] == f"layers/conv3/units/{c['unit']}/channel.png"
        assert c["complete"] and c["width"] == 32, c
    assert not any(c["missing"] for c in cards)

    # Another technique, through its switch: the same grid of that technique's images.
    page.eval("window.scrollTo(0, 0)")
    page.eval("document.querySelector('.segmented a:nth-child(3)').click()")
    page.wait_for("location.hash === '#/layer/conv3?technique=negative'")
    wait_view(page, "layer")
    cards = settle_grid(page)
    assert len(cards) == 32
    for c in cards:
        assert c["src"] == f"layers/conv3/units/{c['unit']}/negative.png"
        assert c["width"] == 32, c


def test_old_layer_page_has_no_items(page, site):
    open_view(page, site + "#/layer/conv3", "layer")
    assert page.eval("document.querySelectorAll('.items, .units-head').length") == 0
    assert page.eval("[...document.querySelectorAll('.segmented a')].map(a => a.textContent)") == TECHNIQUES


def test_layer_page_sorts_by_a_statistic(page, site, atlas_dir):
    open_view(page, site + "#/layer/conv2?sort=max", "layer")
    units = layer_json(atlas_dir, "conv2")["units"]
    expected = [u["unit"] for u in sorted(units, key=lambda u: (-u["dataset"]["max"], u["unit"]))]
    assert [c["unit"] for c in grid(page)] == expected
    assert page.eval("document.getElementById('sort').value") == "max"
    # The other way round.
    page.eval("document.querySelector('.order').click()")
    page.wait_for("location.hash === '#/layer/conv2?sort=max&order=asc'")
    wait_view(page, "layer")
    expected = [u["unit"] for u in sorted(units, key=lambda u: (u["dataset"]["max"], u["unit"]))]
    assert [c["unit"] for c in grid(page)] == expected
    # The select writes the hash.
    page.eval("const s = document.getElementById('sort'); s.value = 'frac_positive'; s.dispatchEvent(new Event('change'))")
    page.wait_for("location.hash === '#/layer/conv2?sort=frac_positive'")


def test_jump_to_unit(page, site):
    open_view(page, site + "#/layer/conv2?technique=neuron", "layer")
    page.eval("document.getElementById('jump').value = '17'")
    page.eval("document.querySelector('form.jump').requestSubmit()")
    page.wait_for("location.hash === '#/layer/conv2/unit/17?technique=neuron'")
    wait_view(page, "unit")
    assert page.eval("document.querySelector('h1').textContent") == "conv2 · unit 17"
    # Back to the layer keeps the technique.
    assert page.eval("document.getElementById('back').getAttribute('href')") == "#/layer/conv2?technique=neuron"


def unit_page_state(page) -> dict:
    return page.eval("""({
      hash: location.hash,
      h1: document.querySelector('h1').textContent,
      images: [...document.querySelectorAll('.technique')].map(f => {
        const img = f.querySelector('.final img');
        return { technique: f.dataset.technique, src: img && img.getAttribute('src'),
                 width: img ? img.naturalWidth : 0,
                 objective: f.querySelector('.objective').textContent };
      }),
    })""")


def wait_unit_images(page) -> None:
    page.wait_for("[...document.querySelectorAll('.technique img')].every(i => i.complete && i.naturalWidth > 0)")


def test_deep_link_opens_the_unit(page, site, atlas_dir):
    open_view(page, site + "#/layer/conv3/unit/5", "unit")
    wait_unit_images(page)
    state = unit_page_state(page)
    assert state["h1"] == "conv3 · unit 5"
    assert [i["technique"] for i in state["images"]] == TECHNIQUES
    entry = next(u for u in layer_json(atlas_dir, "conv3")["units"] if u["unit"] == 5)
    for img in state["images"]:
        assert img["src"] == f"layers/conv3/units/5/{img['technique']}.png"
        assert img["width"] == 32
        assert img["objective"].startswith("objective ")
        assert float(img["objective"].split()[1]) == pytest.approx(entry["techniques"][img["technique"]]["objective"], rel=1e-2, abs=1e-3)
    assert page.eval("document.title").startswith("conv3 unit 5")
    # An atlas without the newer fields: no snapshots, no dead-unit notes, no groups.
    assert page.eval("document.querySelectorAll('.snapshot, .dead-note, .technique.group').length") == 0
    assert page.eval("document.getElementById('prev').getAttribute('href')") == "#/layer/conv3/unit/4"
    assert page.eval("document.getElementById('next').getAttribute('href')") == "#/layer/conv3/unit/6"


def test_arrow_keys_step_through_units(page, site):
    open_view(page, site + "#/layer/conv3/unit/5", "unit")

    def step(key: str, unit: int) -> None:
        page.press(key)
        page.wait_for(f"location.hash === '#/layer/conv3/unit/{unit}'")
        wait_view(page, "unit")
        wait_unit_images(page)
        state = unit_page_state(page)
        assert state["h1"] == f"conv3 · unit {unit}"
        assert state["images"][0]["src"] == f"layers/conv3/units/{unit}/channel.png"

    step("ArrowRight", 6)
    step("ArrowLeft", 5)
    step("ArrowLeft", 4)
    # The back button retraces the steps.
    page.eval("history.back()")
    page.wait_for("location.hash === '#/layer/conv3/unit/5'")
    wait_view(page, "unit")
    assert unit_page_state(page)["h1"] == "conv3 · unit 5"
    # No step past the ends.
    open_view(page, site + "#/layer/conv3/unit/31", "unit")
    page.press("ArrowRight")
    page.browser.pump(0.3)
    assert page.eval("location.hash") == "#/layer/conv3/unit/31"
    assert page.eval("document.getElementById('next')") is None


def test_unit_page_shows_dataset_examples(page, site, atlas_dir):
    unit = 2
    open_view(page, site + f"#/layer/logits/unit/{unit}", "unit")
    entry = next(u for u in layer_json(atlas_dir, "logits")["units"] if u["unit"] == unit)["dataset"]
    for kind in ("top", "bottom"):
        sel = f".examples.{kind} .example"
        page.wait_for(f"[...document.querySelectorAll('{sel} img.crop')].every(i => i.complete && i.naturalWidth > 0)")
        shown = page.eval(f"""[...document.querySelectorAll('{sel}')].map(f => ({{
            crop: f.querySelector('img.crop').getAttribute('src'),
            width: f.querySelector('img.crop').naturalWidth,
            id: f.querySelector('.id').textContent,
            value: f.querySelector('.val').textContent }}))""")
        assert len(shown) == len(entry[kind]) == 4
        for s, e in zip(shown, entry[kind]):
            assert s["crop"] == "layers/logits/" + e["crop"]
            assert s["width"] == 128
            assert s["id"] == e["id"]
            assert float(s["value"]) == pytest.approx(e["value"], rel=1e-2, abs=1e-3)
    # The statistics.
    stats = page.eval("document.querySelector('.stats').innerText")
    assert "max" in stats and "mean" in stats and "std" in stats and "fraction positive" in stats
    assert f"{entry['frac_positive'] * 100:.1f}%" in stats
    # A click shows the whole image.
    page.eval("document.querySelector('.examples.top .example-img').click()")
    page.wait_for("document.querySelector('.examples.top .example-img').classList.contains('show-whole')")
    page.wait_for("(i => i.complete && i.naturalWidth > 0)(document.querySelector('.examples.top img.whole'))")
    assert page.eval("document.querySelector('.examples.top img.whole').getAttribute('src')") == "layers/logits/" + entry["top"][0]["image"]


def test_conv_examples_mark_the_receptive_field(page, site):
    open_view(page, site + "#/layer/conv3/unit/5", "unit")
    assert page.eval("document.querySelectorAll('.examples.top .rf-box').length") == 4
    box = page.eval("document.querySelector('.examples.top .rf-box').style.width")
    assert box.endswith("%") and 0 < float(box[:-1]) < 100


# ------------------------------------------------------------------ connections, trust, labels, search


def unit_entry(atlas: Path, layer: str, unit: int) -> dict:
    return next(u for u in layer_json(atlas, layer)["units"] if u["unit"] == unit)


def score_value(text: str) -> float:
    """A connection's score as the viewer writes it: a sign (+ or the minus sign), then |score|."""
    assert text[0] in "+\u2212", text
    return (-1 if text[0] == "\u2212" else 1) * float(text[1:])


# Each connection card of a unit page: layer, unit, link, sign, score, thumbnail, label.
CONNECTIONS = """kind => [...document.querySelectorAll(`.connections[data-kind=${kind}] .conn`)].map(li => {
  const img = li.querySelector('.thumb img');
  return { layer: li.dataset.layer, unit: Number(li.dataset.unit), href: li.querySelector('a').getAttribute('href'),
           excitatory: li.classList.contains('excitatory'), inhibitory: li.classList.contains('inhibitory'),
           who: li.querySelector('.who').textContent, score: li.querySelector('.score').textContent,
           src: img && img.getAttribute('src'), width: img ? img.naturalWidth : 0,
           label: li.querySelector('.ulabel') && li.querySelector('.ulabel').textContent };
})"""
CONNECTION_IMAGES_LOADED = "[...document.querySelectorAll('.conn')].every(li => { const i = li.querySelector('.thumb img'); return i && i.complete && i.naturalWidth > 0; })"


def check_connections(page, listed: list[dict], kind: str) -> None:
    shown = page.eval(f"({CONNECTIONS})({json.dumps(kind)})")
    assert [(c["layer"], c["unit"]) for c in shown] == [(c["layer"], c["unit"]) for c in listed], kind
    for s, c in zip(shown, listed):
        assert s["href"] == f"#/layer/{c['layer']}/unit/{c['unit']}"
        assert s["who"] == f"{c['layer']} · {c['unit']}"
        # The sign is written, not only coloured.
        assert score_value(s["score"]) == pytest.approx(c["score"], rel=1e-2, abs=1e-3), s
        assert (s["excitatory"], s["inhibitory"]) == (c["score"] > 0, c["score"] < 0), s
        # The other unit's channel image (the main atlas renders channel for every layer).
        assert s["src"] == f"layers/{c['layer']}/units/{c['unit']}/channel.png"
        assert s["width"] == 32
        assert s["label"] == LABELS.get((c["layer"], c["unit"])), s


def test_unit_page_shows_inputs_and_outputs(page, site, atlas_dir):
    # The conv2 unit whose connections mix excitatory and inhibitory ones the most.
    units = layer_json(atlas_dir, "conv2")["units"]
    with_both = [u for u in units if u["dataset"].get("inputs") and u["dataset"].get("outputs")]
    assert with_both, "no conv2 unit has both inputs and outputs: the dataset pass wrote no connections"
    mixed = lambda u: min(sum(c["score"] > 0 for c in u["dataset"]["inputs"] + u["dataset"]["outputs"]), sum(c["score"] < 0 for c in u["dataset"]["inputs"] + u["dataset"]["outputs"]))  # noqa: E731
    entry = max(with_both, key=lambda u: (mixed(u), -u["unit"]))
    unit, ds = entry["unit"], entry["dataset"]
    assert {c["layer"] for c in ds["inputs"]} == {"conv1"} and {c["layer"] for c in ds["outputs"]} == {"conv3"}
    open_view(page, site + f"#/layer/conv2/unit/{unit}", "unit")
    page.wait_for(CONNECTION_IMAGES_LOADED)
    check_connections(page, ds["inputs"], "inputs")
    check_connections(page, ds["outputs"], "outputs")
    assert page.eval("document.querySelectorAll('.connections h2').length") == 2

    # A link opens that unit's page.
    first = ds["outputs"][0]
    page.eval("document.querySelector('.connections[data-kind=outputs] .conn a').click()")
    page.wait_for(f"location.hash === '#/layer/{first['layer']}/unit/{first['unit']}'")
    wait_view(page, "unit")
    assert page.eval("document.querySelector('h1').textContent") == f"{first['layer']} · unit {first['unit']}"

    # The first layer of the job has outputs and no inputs, and says so.
    conv1 = next(u for u in layer_json(atlas_dir, "conv1")["units"] if u["dataset"].get("outputs"))
    assert not conv1["dataset"].get("inputs")
    open_view(page, site + f"#/layer/conv1/unit/{conv1['unit']}", "unit")
    page.wait_for(CONNECTION_IMAGES_LOADED)
    assert page.eval("document.querySelectorAll('.connections[data-kind=inputs] .conn').length") == 0
    assert page.eval("document.querySelector('.connections[data-kind=inputs] p').textContent").startswith("None")
    check_connections(page, conv1["dataset"]["outputs"], "outputs")


@pytest.fixture(scope="session")
def no_channel_site(atlas_dir, tmp_path_factory):
    """The atlas with channel gone from conv1's layer.json (a layer rendered without it)."""
    out = tmp_path_factory.mktemp("viewer") / "no-channel"
    shutil.copytree(atlas_dir, out)
    path = out / "layers" / "conv1" / "layer.json"
    layer = json.loads(path.read_text())
    for u in layer["units"]:
        del u["techniques"]["channel"]
    path.write_text(json.dumps(layer))
    with cdp.serve(out, cwd=ROOT) as base:
        yield base


def test_connection_thumbnails_without_channel(browser, no_channel_site, atlas_dir):
    """A layer that did not render channel: its units' first technique's image stands in."""
    entry = next(u for u in layer_json(atlas_dir, "conv2")["units"] if u["dataset"].get("inputs"))
    with new_page(browser) as page:
        open_view(page, no_channel_site + f"#/layer/conv2/unit/{entry['unit']}", "unit")
        page.wait_for(CONNECTION_IMAGES_LOADED)
        inputs = page.eval(f"({CONNECTIONS})('inputs')")
        assert [c["src"] for c in inputs] == [f"layers/conv1/units/{c['unit']}/neuron.png" for c in entry["dataset"]["inputs"]]
        outputs = page.eval(f"({CONNECTIONS})('outputs')")
        assert [c["src"] for c in outputs] == [f"layers/conv3/units/{c['unit']}/channel.png" for c in entry["dataset"]["outputs"]]
        check_page(page, no_channel_site, allow_missing=False)


TRUST_ORDER = ["above_dataset", "convergence", "diversity", "dead_on_dataset", "dead_on_start"]


def trust_number(name: str, text: str):
    """A trust indicator as the viewer writes it, back to its value."""
    if text in ("yes", "no"):
        return text == "yes"
    if name == "above_dataset":
        assert text.endswith(" σ"), text
        return float(text[:-2])
    if name == "convergence":
        assert text.endswith("%"), text
        return float(text[:-1]) / 100
    return float(text)


def test_unit_page_shows_trust_and_the_curve(page, site, atlas_dir):
    unit = 5
    entry = unit_entry(atlas_dir, "conv3", unit)
    trust = entry.get("trust")
    assert trust, "layer.json has no trust indicators for conv3 unit 5"
    assert {"above_dataset", "convergence", "dead_on_dataset"} <= trust.keys(), trust
    open_view(page, site + f"#/layer/conv3/unit/{unit}", "unit")
    rows = page.eval("""[...document.querySelectorAll('#trust .trust-list > div')].map(d => ({
      name: d.dataset.trust, dt: d.querySelector('dt').textContent,
      value: d.querySelector('.v').textContent, how: d.querySelector('.how').textContent }))""")
    assert [r["name"] for r in rows] == [k for k in TRUST_ORDER if k in trust]
    for r in rows:
        expected = trust[r["name"]]
        if isinstance(expected, bool):
            assert trust_number(r["name"], r["value"]) is expected, r
        else:
            assert trust_number(r["name"], r["value"]) == pytest.approx(expected, rel=1e-2, abs=1e-3), r
        # Each with a line saying how to read it.
        assert len(r["how"]) > 20, r

    # The channel objective by step: a chart and the same numbers as a list.
    curve = entry["techniques"]["channel"]["curve"]
    assert curve[-1]["objective"] == pytest.approx(entry["techniques"]["channel"]["objective"])
    points = page.eval("[...document.querySelectorAll('#curve .curve-points li')].map(li => [Number(li.dataset.step), li.querySelector('.v').textContent])")
    assert [p[0] for p in points] == [p["step"] for p in curve]
    for (_, shown), p in zip(points, curve):
        assert float(shown) == pytest.approx(p["objective"], rel=1e-2, abs=1e-3)
    assert page.eval("document.querySelectorAll('#curve svg circle').length") == len(curve)


@pytest.fixture(scope="session")
def edited_trust_dir(atlas_dir, tmp_path_factory) -> Path:
    """The atlas with conv3's unit 2 dead on the dataset and unit 3 without trust or curve."""
    out = tmp_path_factory.mktemp("viewer") / "edited-trust"
    shutil.copytree(atlas_dir, out)
    path = out / "layers" / "conv3" / "layer.json"
    layer = json.loads(path.read_text())
    for u in layer["units"]:
        if u["unit"] == 2:
            u.setdefault("trust", {})["dead_on_dataset"] = True
        if u["unit"] == 3:
            u.pop("trust", None)
            u["techniques"]["channel"].pop("curve", None)
    path.write_text(json.dumps(layer))
    return out


@pytest.fixture(scope="session")
def edited_trust_site(edited_trust_dir):
    with cdp.serve(edited_trust_dir, cwd=ROOT) as base:
        yield base


def test_trust_explains_a_dead_unit(browser, edited_trust_site):
    with new_page(browser) as page:
        open_view(page, edited_trust_site + "#/layer/conv3/unit/2", "unit")
        row = page.eval("(d => d && [d.className, d.querySelector('.v').textContent])(document.querySelector('#trust [data-trust=dead_on_dataset]'))")
        assert row == ["warn", "yes"]
        # A unit without trust indicators or curve has no trust panel.
        open_view(page, edited_trust_site + "#/layer/conv3/unit/3", "unit")
        assert page.eval("document.getElementById('trust')") is None
        check_page(page, edited_trust_site, allow_missing=False)


@pytest.fixture(scope="session")
def settings_site(atlas_dir, tmp_path_factory):
    """Two copies of the atlas, each served: `maco`, whose settings are MACO with a crop
    schedule, noise and no lucid transforms, and `old`, whose atlas.json predates `param`
    and `transforms`."""
    root = tmp_path_factory.mktemp("viewer") / "settings"
    sites = {}
    with contextlib.ExitStack() as stack:
        for name in ("maco", "old"):
            shutil.copytree(atlas_dir, root / name)
            path = root / name / "atlas.json"
            atlas = json.loads(path.read_text())
            if name == "maco":
                atlas["settings"]["param"]["maco"] = True
                atlas["settings"]["transforms"] = {"pad": 0, "jitter": 0, "scales": [1.0], "angles": [0.0], "jitter_after": 0, "crop": {"start": 0.9, "end": 0.5}, "noise": 0.01}
            else:
                del atlas["settings"]["param"], atlas["settings"]["transforms"]
            path.write_text(json.dumps(atlas))
            sites[name] = stack.enter_context(cdp.serve(root / name, cwd=ROOT))
        yield sites


def test_atlas_page_says_how_the_images_were_rendered(browser, settings_site):
    with new_page(browser) as page:
        open_view(page, settings_site["maco"], "atlas")
        assert page.eval("document.querySelector('#param dd').textContent") == "MACO, magnitude 1/f"
        assert page.eval("document.querySelector('#transforms dd').textContent") == "crop 0.9 to 0.5, noise 0.01"
        # An atlas written before the settings listed them was rendered with lucid's.
        open_view(page, settings_site["old"], "atlas")
        assert page.eval("document.querySelector('#param dd').textContent") == "fft"
        assert page.eval("document.querySelector('#transforms dd').textContent") == "lucid's standard set"


@pytest.fixture(scope="session")
def own_settings_site(atlas_dir, tmp_path_factory):
    """The atlas with conv3 listed as rendered with steps, a parameterisation and transforms
    of its own (a job file's [[layer]]), as atlas.json lists it."""
    out = tmp_path_factory.mktemp("viewer") / "own-settings"
    shutil.copytree(atlas_dir, out)
    atlas = json.loads((out / "atlas.json").read_text())
    own = json.loads(json.dumps(atlas["settings"]))
    own["steps"] = atlas["settings"]["steps"] + 1
    own.setdefault("param", {})["maco"] = True
    own["transforms"] = {"pad": 0, "jitter": 0, "scales": [1.0], "angles": [0.0], "jitter_after": 0, "crop": None, "noise": 0.02}
    next(l for l in atlas["layers"] if l["name"] == "conv3")["settings"] = own
    (out / "atlas.json").write_text(json.dumps(atlas))
    with cdp.serve(out, cwd=ROOT) as base:
        yield base, own["steps"]


def test_layer_page_says_what_its_own_settings_change(browser, own_settings_site):
    site, steps = own_settings_site
    with new_page(browser) as page:
        open_view(page, site + "#/layer/conv3", "layer")
        assert page.eval("document.querySelector('.page-head .own-settings').textContent") == f"own settings: steps {steps}; parameterisation MACO, magnitude 1/f; transforms noise 0.02"
        # A layer with the atlas's settings says nothing.
        open_view(page, site + "#/layer/conv1", "layer")
        assert page.eval("document.querySelector('.page-head .own-settings')") is None
        check_page(page, site, allow_missing=False)


def test_layer_page_sorts_by_trust(browser, edited_trust_site, edited_trust_dir):
    units = layer_json(edited_trust_dir, "conv3")["units"]
    with new_page(browser) as page:
        for name in ("above_dataset", "convergence"):
            values = {u["unit"]: u.get("trust", {}).get(name) for u in units}
            have = sorted((u for u in values if values[u] is not None), key=lambda u: (-values[u], u))
            without = sorted(u for u in values if values[u] is None)
            assert have and 3 in without, name
            open_view(page, edited_trust_site + f"#/layer/conv3?sort={name}", "layer")
            # Highest first, units without the value last.
            assert [c["unit"] for c in grid(page)] == have + without
            assert page.eval("document.getElementById('sort').value") == name
            shown = page.eval("[...document.querySelectorAll('#grid .unit .val')].map(v => v.textContent)")
            for u, text in zip(have, shown):
                assert trust_number(name, text) == pytest.approx(values[u], rel=1e-2, abs=1e-3)
            assert shown[len(have):] == ["—"] * len(without)
            # Lowest first: still without the value last.
            page.eval("document.querySelector('.order').click()")
            page.wait_for(f"location.hash === '#/layer/conv3?sort={name}&order=asc'")
            wait_view(page, "layer")
            have = sorted(have, key=lambda u: (values[u], u))
            assert [c["unit"] for c in grid(page)] == have + without
        # The select offers the trust indicators the layer has, apart from the statistics.
        offered = page.eval("[...document.querySelectorAll('#sort optgroup[label=trust] option')].map(o => o.value)")
        assert offered == [k for k in TRUST_ORDER if any(k in u.get("trust", {}) for u in units)]
        page.eval("const s = document.getElementById('sort'); s.value = 'dead_on_dataset'; s.dispatchEvent(new Event('change'))")
        page.wait_for("location.hash === '#/layer/conv3?sort=dead_on_dataset'")
        wait_view(page, "layer")
        # Dead units first (unit 2, made so), then the others, then those that do not say.
        dead = {u["unit"]: u.get("trust", {}).get("dead_on_dataset") for u in units}
        rank = lambda u: (0 if dead[u] is True else 1 if dead[u] is False else 2, u)  # noqa: E731
        order = [c["unit"] for c in grid(page)]
        assert order == sorted(dead, key=rank)
        assert order[0] == 2 and order[-1] == 3
        check_page(page, edited_trust_site, allow_missing=False)


def test_labels_on_the_unit_page_and_the_grid(page, site):
    open_view(page, site + "#/layer/conv2/unit/5", "unit")
    assert page.eval("document.querySelector('.unit-label').textContent") == "curve detector"
    open_view(page, site + "#/layer/conv2/unit/6", "unit")
    assert page.eval("document.querySelector('.unit-label')") is None
    open_view(page, site + "#/layer/conv2", "layer")
    shown = page.eval("[...document.querySelectorAll('#grid .unit')].filter(li => li.querySelector('.ulabel')).map(li => [Number(li.dataset.unit), li.querySelector('.ulabel').textContent])")
    assert shown == [[u, t] for (layer, u), t in sorted(LABELS.items()) if layer == "conv2"]
    assert page.eval("document.querySelector('#grid .unit[data-unit=\"7\"] a').title") == "unit 7: Red blobs"


SEARCH_HITS = "[...document.querySelectorAll('#search-results .hit a')].map(a => a.getAttribute('href'))"


def search(page, text: str) -> None:
    page.eval(f"(q => {{ q.value = {json.dumps(text)}; q.dispatchEvent(new Event('input')); }})(document.getElementById('q'))")
    page.wait_for("!document.getElementById('search-results').hidden && document.querySelectorAll('#search-results li').length > 0")


def test_search_by_number_and_label(page, site):
    # On the atlas page a number is that unit of every layer that has it.
    open_view(page, site, "atlas")
    search(page, "12")
    assert page.eval(SEARCH_HITS) == ["#/layer/conv1/unit/12", "#/layer/conv2/unit/12", "#/layer/conv3/unit/12"]
    assert page.eval("document.querySelector('#search-results .hit[data-layer=conv3] .ulabel').textContent") == "curved stripes"
    # Text: the labels of every layer, whatever the case.
    search(page, "CURVE")
    assert page.eval(SEARCH_HITS) == ["#/layer/conv2/unit/5", "#/layer/conv3/unit/12"]
    search(page, "red")
    assert page.eval(SEARCH_HITS) == ["#/layer/conv1/unit/3", "#/layer/conv2/unit/7"]
    search(page, "no such label")
    assert page.eval(SEARCH_HITS) == []
    assert "No label contains" in page.eval("document.getElementById('search-results').textContent")
    # A result is a link to the unit.
    search(page, "blobs")
    page.eval("document.querySelector('#search-results .hit a').click()")
    page.wait_for("location.hash === '#/layer/conv2/unit/7'")
    wait_view(page, "unit")
    assert page.eval("document.getElementById('search-results').hidden")

    # On a unit page a number is a unit of its layer; Enter opens the first result.
    search(page, "9")
    assert page.eval(SEARCH_HITS) == ["#/layer/conv2/unit/9"]
    page.eval("document.getElementById('search').requestSubmit()")
    page.wait_for("location.hash === '#/layer/conv2/unit/9'")
    wait_view(page, "unit")
    # Out of the layer's range: no result, and the range.
    search(page, "40")
    assert page.eval(SEARCH_HITS) == []
    assert "conv2 has units 0 to 31" in page.eval("document.getElementById('search-results').textContent")
    # Labels are searched from a layer page too, across layers; Escape closes the list.
    open_view(page, site + "#/layer/logits", "layer")
    search(page, "edge")
    assert page.eval(SEARCH_HITS) == ["#/layer/conv1/unit/3"]
    search(page, "10")
    assert page.eval(SEARCH_HITS) == []  # logits has units 0 to 9
    page.eval("document.getElementById('q').focus()")
    page.press("Escape")
    page.wait_for("document.getElementById('search-results').hidden")


# ------------------------------------------------------------------ the partial atlas


def test_partial_atlas_marks_missing_units(partial_page, partial_site):
    page = partial_page
    # The atlas page does not break on a layer without layer.json.
    open_view(page, partial_site, "atlas")
    assert page.eval("[...document.querySelectorAll('.layer-name')].map(a => a.textContent)") == LAYERS
    assert page.eval("document.querySelector('.layer[data-layer=conv1] .status').textContent") == "in progress"
    assert "in progress" in page.eval("document.getElementById('completeness').textContent")

    # conv1 has no layer.json: every unit is looked for; the gone ones are marked.
    for technique, gone in CONV1_GONE.items():
        open_view(page, partial_site + f"#/layer/conv1?technique={technique}", "layer")
        assert page.eval("!!document.querySelector('.notice')")
        cards = settle_grid(page)
        assert [c["unit"] for c in cards] == list(range(16))
        assert {c["unit"] for c in cards if c["missing"]} == gone, technique
        for c in cards:
            if c["missing"]:
                li = f"#grid .unit[data-unit='{c['unit']}']"
                assert page.eval(f"document.querySelector(\"{li} .placeholder\").textContent") == str(c["unit"])
            else:
                assert c["width"] == 32, c
        # The dataset statistics still come (from examples.json): the sort is offered.
        assert page.eval("!!document.getElementById('sort')")

    # conv2's layer.json lists fewer units: the unlisted ones are looked for too.
    open_view(page, partial_site + "#/layer/conv2", "layer")
    cards = settle_grid(page)
    assert len(cards) == 32
    assert {c["unit"] for c in cards if c["missing"]} == {CONV2_UNLISTED_GONE}
    there = next(c for c in cards if c["unit"] == CONV2_UNLISTED_THERE)
    assert there["width"] == 32 and there["src"] == f"layers/conv2/units/{CONV2_UNLISTED_THERE}/channel.png"

    # A missing unit's page says so; an unlisted one gets its objective from the record.
    open_view(page, partial_site + "#/layer/conv1/unit/7", "unit")
    page.wait_for("document.querySelector('.technique[data-technique=channel]').classList.contains('missing')")
    page.wait_for("document.querySelector('.technique[data-technique=neuron] img').naturalWidth > 0")
    page.wait_for("document.querySelector('.technique[data-technique=neuron] .objective').textContent.startsWith('objective ')")
    assert page.eval("document.querySelector('h1').textContent") == "conv1 · unit 7"


def test_partial_atlas_curve_and_connections(partial_page, partial_site, partial_dir):
    page = partial_page
    # conv1 has no layer.json: the channel curve comes from the unit record.
    record = json.loads((partial_dir / "layers" / "conv1" / "units" / "5" / "channel.json").read_text())
    open_view(page, partial_site + "#/layer/conv1/unit/5", "unit")
    page.wait_for("document.querySelectorAll('#curve .curve-points li').length > 0")
    steps = page.eval("[...document.querySelectorAll('#curve .curve-points li')].map(li => Number(li.dataset.step))")
    assert steps == [p["step"] for p in record["curve"]]
    # Inputs from conv1 are its channel images where loupe writes them; the gone ones are
    # placeholders with the unit's number.
    gone = CONV1_GONE["channel"]
    entry = next(u for u in layer_json(partial_dir, "conv2")["units"] if {c["unit"] for c in u["dataset"].get("inputs", [])} & gone)
    open_view(page, partial_site + f"#/layer/conv2/unit/{entry['unit']}", "unit")
    page.wait_for("[...document.querySelectorAll('.connections[data-kind=inputs] .conn .thumb')].every(t => t.querySelector('.placeholder') || (t.querySelector('img') && t.querySelector('img').complete && t.querySelector('img').naturalWidth > 0))")
    shown = page.eval("""[...document.querySelectorAll('.connections[data-kind=inputs] .conn')].map(li => [Number(li.dataset.unit),
        li.querySelector('.thumb img') ? li.querySelector('.thumb img').getAttribute('src') : li.querySelector('.thumb .placeholder').textContent])""")
    assert shown == [
        [c["unit"], str(c["unit"]) if c["unit"] in gone else f"layers/conv1/units/{c['unit']}/channel.png"] for c in entry["dataset"]["inputs"]
    ]


# ------------------------------------------------------------------ escaped layer names


@pytest.fixture(scope="session")
def escaped_site(atlas_dir, tmp_path_factory):
    """The atlas with conv2 renamed `conv/2`: its directory is the segment `conv%2F2`."""
    out = tmp_path_factory.mktemp("viewer") / "escaped"
    shutil.copytree(atlas_dir, out)
    (out / "layers" / "conv2").rename(out / "layers" / "conv%2F2")
    atlas = json.loads((out / "atlas.json").read_text())
    for layer in atlas["layers"]:
        if layer["name"] == "conv2":
            layer["name"], layer["path"] = "conv/2", "conv%2F2"
    (out / "atlas.json").write_text(json.dumps(atlas))
    with cdp.serve(out, cwd=ROOT) as base:
        yield base


def test_escaped_layer_names(browser, escaped_site):
    with new_page(browser) as page:
        open_view(page, escaped_site, "atlas")
        link = page.eval("(a => [a.textContent, a.getAttribute('href')])([...document.querySelectorAll('.layer-name')][1])")
        assert link == ["conv/2", "#/layer/conv%2F2"]
        page.eval("document.querySelectorAll('.layer-name')[1].click()")
        wait_view(page, "layer")
        assert page.eval("location.hash") == "#/layer/conv%2F2"
        assert page.eval("document.querySelector('h1').textContent") == "conv/2"
        # The segment's `%` is escaped in the URL: the server decodes once.
        cards = settle_grid(page)
        assert len(cards) == 32 and not any(c["missing"] for c in cards)
        assert cards[0]["src"] == "layers/conv%252F2/units/0/channel.png"
        open_view(page, escaped_site + "#/layer/conv%2F2/unit/3", "unit")
        wait_unit_images(page)
        assert page.eval("document.querySelector('h1').textContent") == "conv/2 · unit 3"
        page.wait_for("document.querySelectorAll('.examples img.crop').length === 8")
        page.wait_for("[...document.querySelectorAll('.examples img.crop')].every(i => i.complete && i.naturalWidth > 0)")
        check_page(page, escaped_site, allow_missing=False)


# ------------------------------------------------------------------ no atlas yet, a wide layer


def test_no_atlas_yet(browser, tmp_path):
    """Before a job has written atlas.json the page says so and does not break."""
    install_viewer(tmp_path)
    with new_page(browser) as page:
        with cdp.serve(tmp_path, cwd=ROOT) as base:
            for hash_ in ("", "#/layer/conv1", "#/layer/conv1/unit/3"):
                page.goto("about:blank")
                page.goto(base + hash_)
                page.wait_for("document.querySelector('h1') && document.querySelector('h1').textContent === 'No atlas here yet'")
            assert page.exceptions == []


WIDE = 4096


@pytest.fixture(scope="session")
def wide_site(atlas_dir, tmp_path_factory):
    """The atlas with one more layer, `wide`, of 4,096 units (hard links to one image)."""
    out = tmp_path_factory.mktemp("viewer") / "wide"
    shutil.copytree(atlas_dir, out)
    atlas = json.loads((out / "atlas.json").read_text())
    atlas["layers"].append({"name": "wide", "path": "wide", "units": WIDE, "shape": [WIDE, 4, 4]})
    (out / "atlas.json").write_text(json.dumps(atlas))
    src = out / "layers" / "conv2" / "units" / "0" / "channel.png"
    units = []
    for u in range(WIDE):
        d = out / "layers" / "wide" / "units" / str(u)
        d.mkdir(parents=True)
        (d / "channel.png").hardlink_to(src)
        units.append({"unit": u, "techniques": {"channel": {"image": f"units/{u}/channel.png", "objective": 1.0}}})
    layer = {"format_version": 1, "name": "wide", "shape": [WIDE, 4, 4], "units": units}
    (out / "layers" / "wide" / "layer.json").write_text(json.dumps(layer))
    with cdp.serve(out, cwd=ROOT) as base:
        yield base


def test_a_layer_of_4096_units_loads_lazily(browser, wide_site):
    with new_page(browser) as page:
        open_view(page, wide_site + "#/layer/wide?technique=channel", "layer")
        assert page.eval("document.querySelectorAll('#grid .unit').length") == WIDE
        page.browser.pump(0.5)
        asked = [u for u in page.requests if "/layers/wide/units/" in u]
        assert 0 < len(asked) < 300, f"{len(asked)} thumbnails asked for on the first screen"
        # The far end of the grid loads when it is reached.
        page.eval("document.querySelector('#grid .unit:last-child').scrollIntoView()")
        page.wait_for("(i => i.complete && i.naturalWidth > 0)(document.querySelector('#grid .unit:last-child img'))")
        asked = [u for u in page.requests if "/layers/wide/units/" in u]
        assert len(asked) < 600, f"{len(asked)} thumbnails asked for after a jump to the end"
        # The unit page at the end: no next unit.
        open_view(page, wide_site + f"#/layer/wide/unit/{WIDE - 1}", "unit")
        assert page.eval("document.getElementById('next')") is None
        # Only channel images and no dataset here: the other techniques and examples.json
        # are asked for and not found.
        check_page(page, wide_site, allow_missing=True)


# ------------------------------------------------------------------ diversity, snapshots, per-layer techniques

TECH_LAYERS = ["conv1", "conv3"]
TECH_UNIT_TECHNIQUES = ["channel", "diversity"]
ITEM_TECHNIQUES = ["deepdream", "caricature", "direction"]
DIVERSITY = 4
THRESHOLDS = [4, 8]


def render_techniques_atlas(out: Path, job_dir: Path) -> None:
    """A small job in the manner of docs/examples/demo-job.toml: conv1 and conv3, channel
    and diversity with snapshots, and conv3's DeepDream, caricature and direction."""
    if not LOUPE.exists():
        pytest.fail(f"{LOUPE} is missing: build it first (make build)")
    q = json.dumps  # a JSON string is a TOML basic string
    job = job_dir / "job.toml"
    job.write_text(f"""
model = {q(str(ROOT / "models" / "demo" / "demo.pt"))}
out = "atlas"
layers = {q(TECH_LAYERS)}
techniques = {q(TECH_UNIT_TECHNIQUES)}
steps = 16
size = 32
thresholds = {q(THRESHOLDS)}
dead_units = "reseed"

[diversity]
images = {DIVERSITY}

[caricature]
inputs = [ {{ name = "stripes", uri = {q(str(ROOT / "tests" / "fixtures" / "dataset" / "images" / "stripes-000.jpg"))} }} ]

[[directions]]
name = "unit4"
layer = "conv3"
vector = {q([1.0 if u == 4 else 0.0 for u in range(32)])}

[[layer]]
name = "conv3"
techniques = {q(TECH_UNIT_TECHNIQUES + ITEM_TECHNIQUES)}
""")
    cmd = [str(LOUPE), "render", "--spec", str(job), "--out", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"loupe render --spec failed:\n{r.stdout}\n{r.stderr}"
    assert (out / "layers" / "conv3" / "layer.json").exists()


@pytest.fixture(scope="session")
def techniques_dir(tmp_path_factory) -> Path:
    job_dir = tmp_path_factory.mktemp("viewer-techniques")
    out = job_dir / "atlas"
    render_techniques_atlas(out, job_dir)
    install_viewer(out)
    return out


@pytest.fixture(scope="session")
def techniques_site(techniques_dir):
    with cdp.serve(techniques_dir, cwd=ROOT) as base:
        yield base


@pytest.fixture
def tech_page(browser, techniques_site):
    with new_page(browser) as p:
        yield p
        # No dataset and no labels here: examples.json and labels.json are asked for and
        # not found, and nothing else.
        check_page(p, techniques_site, allow_missing=True)
        assert all(u.endswith(("/examples.json", "/labels.json")) for u, _ in p.failed), p.failed


# A unit page's figures: technique, the final images, the snapshots with their steps.
UNIT_FIGURES = """[...document.querySelectorAll('.technique')].map(f => ({
  technique: f.dataset.technique,
  group: f.classList.contains('group'),
  dead: !!f.querySelector('.dead-note'),
  caption: f.querySelector('figcaption').textContent,
  final: [...f.querySelectorAll('.final img')].map(i => ({ src: i.getAttribute('src'), width: i.naturalWidth })),
  snapshots: [...f.querySelectorAll('.snapshot')].map(s => ({
    step: Number(s.dataset.step), label: s.querySelector('.step').textContent,
    images: [...s.querySelectorAll('img')].map(i => ({ src: i.getAttribute('src'), width: i.naturalWidth })) })),
}))"""

ITEM_IMAGES_LOADED = "[...document.querySelectorAll('.items img')].every(i => i.getAttribute('src') && i.complete && i.naturalWidth === 32)"
ALL_IMAGES_LOADED = "[...document.images].filter(i => i.getAttribute('src')).every(i => i.complete && i.naturalWidth > 0)"


def test_unit_page_shows_diversity_and_snapshots(tech_page, techniques_site, techniques_dir):
    page = tech_page
    unit = 1
    open_view(page, techniques_site + f"#/layer/conv3/unit/{unit}", "unit")
    page.wait_for(ALL_IMAGES_LOADED)
    figures = page.eval(UNIT_FIGURES)
    # Per-unit techniques only, channel before diversity; the per-layer ones are not units'.
    assert [f["technique"] for f in figures] == TECH_UNIT_TECHNIQUES
    entry = next(u for u in layer_json(techniques_dir, "conv3")["units"] if u["unit"] == unit)["techniques"]
    base = f"layers/conv3/units/{unit}"
    channel, diversity = figures

    # channel: one final image, after its snapshots at each threshold.
    assert not channel["group"]
    assert channel["final"] == [{"src": f"{base}/channel.png", "width": 32}]
    assert [s["step"] for s in channel["snapshots"]] == THRESHOLDS
    assert [s["label"] for s in channel["snapshots"]] == [f"step {t}" for t in THRESHOLDS]
    for s in channel["snapshots"]:
        assert s["images"] == [{"src": f"{base}/channel.step{s['step']}.png", "width": 32}]

    # diversity: its four images side by side, a labelled group.
    assert diversity["group"]
    assert diversity["caption"].startswith("diversity") and f"{DIVERSITY} images" in diversity["caption"]
    assert diversity["final"] == [{"src": f"{base}/diversity-{i}.png", "width": 32} for i in range(DIVERSITY)]
    assert ["layers/conv3/" + p for p in entry["diversity"]["images"]] == [f["src"] for f in diversity["final"]]
    assert [s["step"] for s in diversity["snapshots"]] == THRESHOLDS
    for s in diversity["snapshots"]:
        assert s["images"] == [{"src": f"{base}/diversity-{i}.step{s['step']}.png", "width": 32} for i in range(DIVERSITY)]
        assert s["label"] == f"step {s['step']}"
    assert "objective " in diversity["caption"]

    # A dead unit is said to be one, and only then.
    for f in figures:
        assert f["dead"] == bool(entry[f["technique"]].get("dead")), f["technique"]


def test_layer_page_shows_per_layer_techniques(tech_page, techniques_site, techniques_dir):
    page = tech_page
    open_view(page, techniques_site + "#/layer/conv3", "layer")
    layer = layer_json(techniques_dir, "conv3")
    # Item images are lazy: their src is set when they come near the screen, so wait for
    # every one to have loaded before reading them.
    page.wait_for("document.querySelectorAll('.items img').length >= 3")
    page.wait_for(ITEM_IMAGES_LOADED)
    sections = page.eval("""[...document.querySelectorAll('.items')].map(s => ({
      technique: s.dataset.technique, heading: s.querySelector('h2').textContent,
      items: [...s.querySelectorAll('.item')].map(li => ({
        item: li.dataset.item, name: li.querySelector('.iname').textContent,
        objective: li.querySelector('.objective').textContent,
        src: li.querySelector('.final img') && li.querySelector('.final img').getAttribute('src'),
        steps: [...li.querySelectorAll('.snapshot .step')].map(s => s.textContent) })) }))""")
    assert [s["technique"] for s in sections] == ITEM_TECHNIQUES
    assert [s["heading"] for s in sections] == ["DeepDream", "Caricatures", "Directions"]
    expected_names = {"deepdream": ["noise"], "caricature": ["stripes"], "direction": ["unit4"]}
    for s in sections:
        listed = layer["items"][s["technique"]]
        assert [i["item"] for i in s["items"]] == [e["item"] for e in listed] == expected_names[s["technique"]]
        for shown, e in zip(s["items"], listed):
            assert shown["name"] == e["item"]
            assert shown["src"] == "layers/conv3/" + e["image"]
            assert float(shown["objective"].split()[1]) == pytest.approx(e["objective"], rel=1e-2, abs=1e-3)
            assert shown["steps"] == [f"step {x['step']}" for x in e.get("snapshots", [])]

    # The grid's technique switch offers the per-unit techniques; diversity shows its
    # first image.
    assert page.eval("[...document.querySelectorAll('.segmented a')].map(a => a.textContent)") == TECH_UNIT_TECHNIQUES
    page.eval("document.querySelector('.segmented a:nth-child(2)').click()")
    page.wait_for("location.hash === '#/layer/conv3?technique=diversity'")
    wait_view(page, "layer")
    cards = settle_grid(page)
    assert [c["unit"] for c in cards] == list(range(32))
    for c in cards:
        assert c["src"] == f"layers/conv3/units/{c['unit']}/diversity-0.png"
        assert c["width"] == 32 and not c["missing"], c

    # conv1 has no per-layer techniques: no item sections.
    open_view(page, techniques_site + "#/layer/conv1", "layer")
    assert page.eval("document.querySelectorAll('.items').length") == 0
    # The atlas page counts conv3's items.
    open_view(page, techniques_site, "atlas")
    page.wait_for("!!document.querySelector('.layer[data-layer=conv3] .items-count')")
    n = sum(len(v) for v in layer["items"].values())
    assert page.eval("document.querySelector('.layer[data-layer=conv3] .items-count').textContent") == f"{n} layer image{'s' if n != 1 else ''}"
    page.wait_for(ALL_IMAGES_LOADED)


@pytest.fixture(scope="session")
def edited_site(techniques_dir, tmp_path_factory):
    """The techniques atlas with conv3's unit 0 marked dead in layer.json, and conv1's
    layer.json gone (a layer still being written: the unit records stand in for it)."""
    out = tmp_path_factory.mktemp("viewer") / "edited"
    shutil.copytree(techniques_dir, out)
    path = out / "layers" / "conv3" / "layer.json"
    layer = json.loads(path.read_text())
    for u in layer["units"]:
        for t in u["techniques"].values():
            t.pop("dead", None)
        if u["unit"] == 0:
            u["techniques"]["channel"]["dead"] = True
    path.write_text(json.dumps(layer))
    (out / "layers" / "conv1" / "layer.json").unlink()
    with cdp.serve(out, cwd=ROOT) as base:
        yield base


def test_dead_units_and_unit_records(browser, edited_site):
    with new_page(browser) as page:
        open_view(page, edited_site + "#/layer/conv3/unit/0", "unit")
        figures = page.eval(UNIT_FIGURES)
        assert [(f["technique"], f["dead"]) for f in figures] == [("channel", True), ("diversity", False)]
        note = page.eval("document.querySelector('.technique[data-technique=channel] .dead-note').textContent")
        assert note == "dead unit: no start image excited it"
        open_view(page, edited_site + "#/layer/conv3?technique=channel", "layer")
        assert page.eval("document.querySelector('#grid .unit[data-unit=\"0\"] .tag.dead').textContent") == "dead"
        assert page.eval("document.querySelectorAll('#grid .tag.dead').length") == 1

        # Without layer.json, the diversity images and snapshots come from the record.
        open_view(page, edited_site + "#/layer/conv1/unit/1", "unit")
        page.wait_for("document.querySelectorAll('.technique[data-technique=diversity] .final img').length === 4")
        page.wait_for("document.querySelectorAll('.technique[data-technique=channel] .snapshot').length === 2")
        page.wait_for(ALL_IMAGES_LOADED)
        figures = page.eval(UNIT_FIGURES)
        diversity = figures[1]
        assert diversity["final"] == [{"src": f"layers/conv1/units/1/diversity-{i}.png", "width": 32} for i in range(DIVERSITY)]
        assert [s["label"] for s in diversity["snapshots"]] == [f"step {t}" for t in THRESHOLDS]
        page.wait_for("document.querySelector('.technique[data-technique=diversity] .objective').textContent.startsWith('objective ')")
        # Only the missing layer.json (and examples.json and labels.json: no dataset, no
        # labels) were asked for in vain.
        check_page(page, edited_site, allow_missing=True)
        assert all(u.endswith(("/layer.json", "/examples.json", "/labels.json")) for u, _ in page.failed), page.failed


FAILED_REASON = "objective became NaN at step 5"


@pytest.fixture(scope="session")
def failed_site(techniques_dir, tmp_path_factory):
    """The techniques atlas with conv3's unit 1 channel image and its caricature recorded
    as failed in layer.json, as loupe lists an optimisation that diverged: no image, the
    reason."""
    out = tmp_path_factory.mktemp("viewer") / "failed"
    shutil.copytree(techniques_dir, out)
    path = out / "layers" / "conv3" / "layer.json"
    layer = json.loads(path.read_text())
    for u in layer["units"]:
        if u["unit"] == 1:
            u["techniques"]["channel"] = {"failed": FAILED_REASON}
    layer["items"]["caricature"] = [{"item": "stripes", "failed": FAILED_REASON}]
    path.write_text(json.dumps(layer))
    (out / "layers" / "conv3" / "units" / "1" / "channel.png").unlink()
    with cdp.serve(out, cwd=ROOT) as base:
        yield base


def test_failed_units_and_items_show_their_reason(browser, failed_site):
    note = f"failed: {FAILED_REASON} (the optimisation diverged)"
    with new_page(browser) as page:
        open_view(page, failed_site + "#/layer/conv3?technique=channel", "layer")
        card = "#grid .unit[data-unit=\"1\"]"
        assert page.eval(f"document.querySelector('{card}').classList.contains('failed')")
        assert page.eval(f"document.querySelector('{card} .tag.failed').title") == note
        assert page.eval("document.querySelectorAll('#grid .unit.failed').length") == 1
        item = ".items[data-technique=caricature] .item"
        assert page.eval(f"document.querySelector('{item}').classList.contains('failed')")
        assert page.eval(f"document.querySelector('{item} .failed-note').textContent") == note
        open_view(page, failed_site + "#/layer/conv3/unit/1", "unit")
        assert page.eval("document.querySelector('.technique[data-technique=channel] .failed-note').textContent") == note
        assert page.eval("document.querySelectorAll('.technique[data-technique=channel] .final img').length") == 0
        # The failed image is never asked for.
        check_page(page, failed_site, allow_missing=True)
        assert not [u for u in page.requests if u.endswith("/units/1/channel.png")]
