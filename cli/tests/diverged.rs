//! A unit whose optimisation diverges: recorded as failed with its reason, the rest of
//! its batch and of the job rendered as without it, and the job a success.

mod common;
use common::*;

use std::path::Path;

/// tests/fixtures/diverges.pt: conv unit 2 turns NaN once it exceeds its value on grey.
const ARGS: &[&str] = &["--techniques", "channel,neuron", "--steps", "32", "--size", "16", "--device", "cpu", "--batch", "4"];

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn a_diverging_unit_is_recorded_failed_and_the_job_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    let o = render(&fixture("diverges.pt"), &out, ARGS);
    assert_ok(&o);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("atlas complete") && said.contains("2 images failed"), "{said}");

    let conv = out.join("layers/conv");
    let index = json(&conv.join("layer.json"));
    for technique in ["channel", "neuron"] {
        let failed = &index["units"][2]["techniques"][technique];
        let reason = failed["failed"].as_str().unwrap_or_else(|| panic!("{technique}: {failed}"));
        // During the steps (through the random transforms) or on the final image.
        assert!(reason.starts_with("objective became NaN at step ") || reason == "objective is NaN on the final image", "{technique}: {reason}");
        assert!(failed.get("image").is_none());
        assert!(!conv.join(format!("units/2/{technique}.png")).exists());
        assert_eq!(json(&conv.join(format!("units/2/{technique}.json")))["failed"], reason);
    }

    // The other units render exactly as in a job without unit 2.
    let without = dir.path().join("without");
    assert_ok(&render(&fixture("diverges.pt"), &without, &[ARGS, &["--units", "0,1,3"]].concat()));
    for unit in [0, 1, 3] {
        for technique in ["channel", "neuron"] {
            let png = format!("layers/conv/units/{unit}/{technique}.png");
            assert_eq!(std::fs::read(out.join(&png)).unwrap(), std::fs::read(without.join(&png)).unwrap(), "{png}");
            assert!(index["units"][unit]["techniques"][technique]["objective"].is_number());
        }
    }

    // A resume keeps the failure: nothing is rendered again.
    let again = render(&fixture("diverges.pt"), &out, ARGS);
    assert_ok(&again);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("rendering 0 images"), "{said}");
}
