"""The checks at the end of bench/chaos.sh: the atlas the cluster wrote under faults
against the expected images and a quiet local render of the same jobs. Prints one line
per check and exits 1 when any fails.

Both atlases are local directories here (the cluster's synced down from S3)."""

import argparse
import json
import pathlib
import sys

import pyarrow.parquet as pq
from PIL import Image


def unit_list(spec, count):
    """The units a `--units` value selects from a layer of `count` units."""
    if spec == "all":
        return list(range(count))
    if ".." in spec:
        start, end = spec.split("..")
        return list(range(int(start), min(int(end), count)))
    return [int(u) for u in spec.split(",") if int(u) < count]


def unit_images(technique, diversity):
    """The final image names of one unit's technique, in the order layer.json lists them."""
    if technique == "diversity":
        return [f"diversity-{i}.png" for i in range(diversity)]
    return [f"{technique}.png"]


def snapshot(image, step):
    return image[: -len(".png")] + f".step{step}.png"


def expected_images(args):
    """Every PNG key the two jobs must leave, relative to the atlas root, by layer."""
    counts = dict(kv.split("=") for kv in args.model_layers.split(","))
    steps = [t for t in (int(x) for x in args.thresholds.split(",") if x) if t < args.steps]
    expected = {}
    for layer in args.layers.split(","):
        keys = set()
        for unit in unit_list(args.units, int(counts[layer])):
            for technique in args.techniques.split(","):
                for image in unit_images(technique, args.diversity):
                    keys.add(f"layers/{layer}/units/{unit}/{image}")
                    keys.update(f"layers/{layer}/units/{unit}/{snapshot(image, s)}" for s in steps)
        expected[layer] = keys
    return expected, steps


class Checks:
    def __init__(self):
        self.failed = 0

    def report(self, name, problems, detail=""):
        """One check's line; `problems` lists what is wrong (empty: it passed)."""
        if problems:
            self.failed += 1
            print(f"FAIL  {name}: {len(problems)} problem(s)")
            for p in problems[:10]:
                print(f"        {p}")
            if len(problems) > 10:
                print(f"        ... and {len(problems) - 10} more")
        else:
            print(f"ok    {name}{': ' + detail if detail else ''}")


def check_jobs(checks, jobs_file, job_ids):
    """Every job the coordinators know has ended, and the chaos run's jobs succeeded."""
    lines = [line.split() for line in pathlib.Path(jobs_file).read_text().splitlines() if line.strip()]
    states = {words[0]: words[1].rstrip(":") for words in lines if len(words) > 1}
    problems = [f"{job} is {state}" for job, state in states.items() if job not in job_ids and state not in ("succeeded", "failed", "cancelled")]
    problems += [f"{job} is {states.get(job, 'not listed')}, not succeeded" for job in job_ids if states.get(job) != "succeeded"]
    checks.report("every job terminal, both jobs succeeded", problems, f"{len(states)} job(s): " + ", ".join(f"{j} {s}" for j, s in states.items()))


def check_atlas_json(checks, cluster, quiet, layers):
    """atlas.json lists both jobs' layers once, and says what the quiet run's says: only
    `created` may differ."""
    try:
        doc, quiet_doc = (json.loads((atlas / "atlas.json").read_text()) for atlas in (cluster, quiet))
        listed = [entry["name"] for entry in doc["layers"]]
    except (OSError, ValueError, KeyError) as e:
        checks.report("atlas.json lists both jobs' layers", [f"atlas.json unreadable: {e}"])
        return
    problems = [f"layer {name} missing from atlas.json" for name in layers if name not in listed]
    problems += [f"layer {name} listed {listed.count(name)} times" for name in set(listed) if listed.count(name) > 1]
    problems += [f"`{key}` differs from the quiet run's" for key in sorted(set(doc) | set(quiet_doc)) if key != "created" and doc.get(key) != quiet_doc.get(key)]
    checks.report("atlas.json lists both jobs' layers, as the quiet run's does", problems, ", ".join(listed))


def listed_images(entry):
    """The PNGs one technique entry of layer.json names: its images and snapshots."""
    images = entry.get("images") or ([entry["image"]] if "image" in entry else [])
    return images + [image for snap in entry.get("snapshots", []) for image in snap["images"]]


def check_images_once(checks, cluster, expected):
    """layer.json names every expected image exactly once, and the PNGs on the store are
    exactly the expected ones."""
    problems = []
    for layer, keys in expected.items():
        try:
            doc = json.loads((cluster / "layers" / layer / "layer.json").read_text())
        except (OSError, ValueError) as e:
            problems.append(f"layers/{layer}/layer.json unreadable: {e}")
            continue
        named = []
        for unit in doc["units"]:
            for technique, entry in unit["techniques"].items():
                if "failed" in entry:
                    problems.append(f"{layer} unit {unit['unit']} {technique} failed: {entry['failed']}")
                named += [f"layers/{layer}/{image}" for image in listed_images(entry)]
        problems += [f"{key} named {named.count(key)} times in layer.json" for key in set(named) if named.count(key) > 1]
        problems += [f"{key} not in layer.json" for key in sorted(keys - set(named))]
        problems += [f"{key} in layer.json but not expected" for key in sorted(set(named) - keys)]
    stored = {str(p.relative_to(cluster)) for p in (cluster / "layers").rglob("*.png")}
    want = set().union(*expected.values())
    problems += [f"{key} missing from the store" for key in sorted(want - stored)]
    problems += [f"{key} on the store but not expected" for key in sorted(stored - want)]
    checks.report("every image present once", problems, f"{len(want)} images in {len(expected)} layers")


def check_pngs_decode(checks, cluster, size):
    problems = []
    pngs = sorted((cluster / "layers").rglob("*.png"))
    for path in pngs:
        try:
            with Image.open(path) as im:
                im.load()
                if im.size != (size, size):
                    problems.append(f"{path.relative_to(cluster)} is {im.size}, not {size}x{size}")
        except Exception as e:  # noqa: BLE001 - any decoder error is the finding
            problems.append(f"{path.relative_to(cluster)}: {e}")
    checks.report("every PNG decodes", problems, f"{len(pngs)} PNGs")


def layer_files(atlas, layer, pattern):
    root = atlas / "layers" / layer
    return {str(p.relative_to(atlas)) for p in root.rglob(pattern) if p.is_file()}


def compare(checks, name, cluster, quiet, keys):
    """The files at `keys` are byte-identical in both atlases."""
    problems = []
    for key in sorted(keys):
        a, b = cluster / key, quiet / key
        if not a.is_file():
            problems.append(f"{key} missing from the cluster's atlas")
        elif not b.is_file():
            problems.append(f"{key} missing from the quiet run's atlas")
        elif a.read_bytes() != b.read_bytes():
            problems.append(f"{key} differs")
    checks.report(name, problems, f"{len(keys)} files identical")


def check_stats(checks, cluster, quiet, stats_layers, units):
    """The dataset files: stats.parquet, examples.json, skipped.json and the example
    crops, byte for byte; and each stats.parquet has one row per unit."""
    keys = set()
    problems = []
    for layer in stats_layers:
        keys |= {f"layers/{layer}/{f}" for f in ("stats.parquet", "examples.json", "skipped.json")}
        keys |= layer_files(quiet, layer, "examples/*") | layer_files(cluster, layer, "examples/*")
        path = cluster / "layers" / layer / "stats.parquet"
        if not path.is_file():
            continue  # the comparison below reports it missing
        try:
            rows = pq.read_table(path).column("unit").to_pylist()
        except Exception as e:  # noqa: BLE001 - any reader error is the finding
            problems.append(f"{layer}/stats.parquet unreadable: {e}")
            continue
        if rows != units[layer]:
            problems.append(f"{layer}/stats.parquet has units {rows[:5]}..., not the job's {len(units[layer])}")
    if problems:
        checks.report("stats.parquet has one row per unit", problems)
    compare(checks, "statistics byte-identical to the quiet run's", cluster, quiet, keys)


def check_partials(checks, cluster):
    left = sorted(str(p.relative_to(cluster)) for p in (cluster / "partials").rglob("*") if p.is_file()) if (cluster / "partials").exists() else []
    checks.report("no dataset partials left after the jobs", [f"{key} left" for key in left])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cluster", type=pathlib.Path, required=True)
    ap.add_argument("--quiet", type=pathlib.Path, required=True)
    ap.add_argument("--jobs", required=True, help="`loupe jobs` output after the run")
    ap.add_argument("--job", action="append", default=[], help="a job of the run (repeat)")
    ap.add_argument("--model-layers", required=True, help="name=units,... as `loupe inspect` lists them")
    ap.add_argument("--layers", required=True, help="both jobs' layers")
    ap.add_argument("--stats-layers", required=True, help="the layers of the job with the dataset")
    ap.add_argument("--units", required=True)
    ap.add_argument("--techniques", required=True)
    ap.add_argument("--diversity", type=int, required=True)
    ap.add_argument("--thresholds", default="")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    args = ap.parse_args()

    expected, _ = expected_images(args)
    counts = dict(kv.split("=") for kv in args.model_layers.split(","))
    units = {layer: unit_list(args.units, int(counts[layer])) for layer in counts}
    checks = Checks()
    check_jobs(checks, args.jobs, args.job)
    check_atlas_json(checks, args.cluster, args.quiet, args.layers.split(","))
    check_images_once(checks, args.cluster, expected)
    check_pngs_decode(checks, args.cluster, args.size)
    check_stats(checks, args.cluster, args.quiet, args.stats_layers.split(","), units)
    images = set().union(*expected.values())
    compare(checks, "images byte-identical to the quiet run's", args.cluster, args.quiet, images)
    records = {key for layer in expected for key in layer_files(args.quiet, layer, "units/*/*.json")}
    records |= {f"layers/{layer}/layer.json" for layer in expected}
    compare(checks, "unit records and layer.json identical to the quiet run's", args.cluster, args.quiet, records)
    check_partials(checks, args.cluster)
    print(f"{'FAILED' if checks.failed else 'PASSED'}: {checks.failed} check(s) failed")
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
