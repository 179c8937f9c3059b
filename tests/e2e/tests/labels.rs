//! `loupe label` on an atlas in S3 (s3s-fs on a loopback port) and in a local directory:
//! the real binary labels, relabels and removes labels, and refuses a layer or unit the
//! atlas does not have without writing anything.

use std::process::{Command, Output};

use loupe_core::s3::{S3Config, S3Credentials, S3Store};
use loupe_core::store::ArtifactStore;
use loupe_e2e::*;

fn label(s3: &S3Server, args: &[&str]) -> Output {
    Command::new(binary("loupe")).arg("label").args(args).envs(s3.env()).output().unwrap()
}

fn json(bytes: Option<Vec<u8>>) -> serde_json::Value {
    serde_json::from_slice(&bytes.expect("the object exists")).unwrap()
}

#[test]
fn labels_are_written_replaced_and_removed_in_an_s3_atlas() {
    let _one = serial();
    let rt = runtime();
    let s3 = S3Server::start(&["atlas"]);
    let config = S3Config {
        endpoint: Some(s3.endpoint()),
        force_path_style: true,
        credentials: Some(S3Credentials::new(loupe_testsupport::S3_ACCESS_KEY, loupe_testsupport::S3_SECRET_KEY)),
        region: Some(loupe_testsupport::S3_REGION.into()),
        ..Default::default()
    };
    let store = S3Store::new("atlas", "a", &config).unwrap();

    // The smallest atlas of the tiny model (layers conv, 4 units, and logits, 3): two
    // images of one step, rendered locally and copied to S3. atlas.json lists every unit.
    let local = tempfile::tempdir().unwrap();
    let out = local.path().join("atlas");
    let o = Command::new(binary("loupe"))
        .current_dir(repo())
        .args(["render", "--model", "tests/fixtures/tiny.pt", "--device", "cpu", "--units", "0..1"])
        .args(["--techniques", "channel", "--steps", "1", "--size", "16", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_ok(&o);
    for key in walk(&out) {
        rt.block_on(store.put(&key, std::fs::read(out.join(&key)).unwrap())).unwrap();
    }
    let get = |key: &str| rt.block_on(store.get(key)).unwrap();
    let keys = || rt.block_on(store.list("")).unwrap();
    assert!(get("labels.json").is_none(), "no labels before the first");

    let o = label(&s3, &["s3://atlas/a", "conv", "3", "  curve detector "]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "labelled conv unit 3: \"curve detector\"");
    let o = label(&s3, &["s3://atlas/a", "logits", "0", "-ve: not a dog"]);
    assert_ok(&o);
    let mut file = json(get("labels/conv/3.json"));
    let updated = file.as_object_mut().unwrap().remove("updated");
    assert!(updated.as_ref().and_then(|t| t.as_str()).is_some_and(|t| t.ends_with('Z')), "updated: {updated:?}");
    assert_eq!(file, serde_json::json!({ "layer": "conv", "unit": 3, "text": "curve detector" }));
    assert_eq!(
        json(get("labels.json")),
        serde_json::json!({ "format_version": 1, "labels": { "conv": { "3": "curve detector" }, "logits": { "0": "-ve: not a dog" } } })
    );

    let o = label(&s3, &["s3://atlas/a", "conv", "3", "high-low frequency"]);
    assert_ok(&o);
    assert_eq!(json(get("labels/conv/3.json"))["text"], "high-low frequency");
    assert_eq!(json(get("labels.json"))["labels"]["conv"], serde_json::json!({ "3": "high-low frequency" }));

    let o = label(&s3, &["s3://atlas/a", "conv", "3", ""]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "removed the label of conv unit 3");
    assert!(get("labels/conv/3.json").is_none());
    assert_eq!(json(get("labels.json"))["labels"], serde_json::json!({ "logits": { "0": "-ve: not a dog" } }));

    // A layer or unit the atlas does not have: an error that names it, and nothing written.
    let (before, labels_before) = (keys(), get("labels.json"));
    for (args, words) in [
        (["s3://atlas/a", "conv9", "0", "x"], &["conv9", "conv, logits"][..]),
        (["s3://atlas/a", "conv", "4", "x"], &["conv", "4 units", "no unit 4"][..]),
        (["s3://atlas/a", "logits", "2", "two\nlines"], &["control character"][..]),
        (["s3://atlas/missing", "conv", "0", "x"], &["s3://atlas/missing", "no atlas.json"][..]),
    ] {
        let o = label(&s3, &args);
        assert!(!o.status.success(), "{args:?} was accepted: {}", stdout(&o));
        let err = stderr(&o);
        assert!(words.iter().all(|w| err.contains(w)), "{args:?}: {err}");
        assert_eq!((keys(), get("labels.json")), (before.clone(), labels_before.clone()), "{args:?} wrote something");
    }
    let missing = S3Store::new("atlas", "missing", &config).unwrap();
    assert!(rt.block_on(missing.list("")).unwrap().is_empty(), "nothing written where there is no atlas");

    // The same command on the local copy.
    let o = Command::new(binary("loupe")).arg("label").arg(&out).args(["logits", "2", "cat"]).output().unwrap();
    assert_ok(&o);
    let local_labels: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("labels.json")).unwrap()).unwrap();
    assert_eq!(local_labels["labels"], serde_json::json!({ "logits": { "2": "cat" } }));
    assert!(out.join("labels/logits/2.json").is_file());
}
