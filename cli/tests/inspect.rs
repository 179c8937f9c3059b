//! `loupe inspect` lists each layer's name, unit count and shape.

mod common;
use common::*;

#[test]
fn inspect_lists_the_demo_models_layers() {
    let o = loupe().arg("inspect").arg("--model").arg(demo_model()).output().unwrap();
    assert_ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<Vec<&str>> = text.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
    let summary: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(summary, vec![("conv1", "16"), ("conv2", "32"), ("conv3", "32"), ("logits", "10")], "{text}");
    assert!(text.contains("input 64x64"), "the sidecar's input size is used: {text}");
    assert!(rows[0].join(" ").ends_with("[16, 64, 64]"), "{text}");
}

#[test]
fn inspect_names_a_bad_model() {
    let o = loupe().arg("inspect").arg("--model").arg(fixture("not_dict.pt")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("must return Dict[str, Tensor]"));
}
