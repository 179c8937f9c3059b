//! Bad input: each case exits non-zero, names the problem, and marks nothing complete.

mod common;
use common::*;

fn assert_refused(args: &[&str], model: &std::path::Path, expect: &str) {
    assert_refused_with(args, model, expect, &[]);
}

/// As `assert_refused`, with extra environment variables for `loupe`.
fn assert_refused_with(args: &[&str], model: &std::path::Path, expect: &str, env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    let o = render_command(model, &out, args).envs(env.iter().copied()).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(stderr.contains(expect), "message for {args:?} should contain {expect:?}, got: {stderr}");
    let written: Vec<_> = files(&out).into_iter().filter(|f| f.ends_with(".json")).collect();
    assert!(written.is_empty(), "nothing may be marked complete, found {written:?}");
}

const FAST: &[&str] = &["--steps", "2", "--size", "16", "--device", "cpu"];

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    FAST.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn a_missing_model_file() {
    assert_refused(FAST, &fixture("no_such_model.pt"), "does not exist");
}

#[test]
fn a_file_that_is_not_torchscript() {
    assert_refused(FAST, &fixture("not_torchscript.pt"), "is not a TorchScript model");
}

#[test]
fn a_model_whose_forward_does_not_return_a_dict() {
    assert_refused(FAST, &fixture("not_dict.pt"), "must return Dict[str, Tensor]");
}

#[test]
fn an_unknown_layer() {
    assert_refused(&with(&["--layers", "conv,nope"]), &fixture("tiny.pt"), "unknown layer \"nope\"");
}

#[test]
fn units_out_of_range() {
    assert_refused(&with(&["--layers", "conv", "--units", "0..99"]), &fixture("tiny.pt"), "unit 4 is out of range");
}

#[test]
fn zero_steps() {
    assert_refused(&["--steps", "0", "--device", "cpu"], &fixture("tiny.pt"), "--steps must be at least 1");
}

/// No GPU is visible to the process (an empty CUDA_VISIBLE_DEVICES hides every GPU, so
/// the case is the same on a machine that has one): `cuda:0` is refused, not run on the CPU.
#[test]
fn cuda_on_a_machine_without_cuda() {
    assert_refused_with(&["--steps", "2", "--device", "cuda:0"], &fixture("tiny.pt"), "CUDA is not available", &[("CUDA_VISIBLE_DEVICES", "")]);
}

#[test]
fn an_unknown_technique() {
    assert_refused(&with(&["--techniques", "channel,dream"]), &fixture("tiny.pt"), "unknown technique \"dream\"");
}

#[test]
fn an_atlas_of_other_settings_is_not_mixed_into() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    assert_ok(&render(&fixture("tiny.pt"), &out, &with(&["--layers", "logits"])));
    let before = files(&out);
    let o = render(&fixture("tiny.pt"), &out, &["--steps", "3", "--size", "16", "--device", "cpu", "--layers", "logits"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("other settings"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(files(&out), before, "the existing atlas is untouched");
}
