//! Property tests of the job spec as it arrives from outside: any bytes, and a valid
//! spec's JSON with bytes edited or a value anywhere in it replaced, are read and
//! validated to a spec or an error, never a panic.

use proptest::prelude::*;
use serde_json::Value;

use loupe_core::spec::{DatasetSpec, Direction, JobSpec, LayerInfo, LayerPlan, ModelRef, NamedImage, RenderSettings, Technique};
use loupe_core::units::UnitRanges;

/// A spec using every part of the format: two layers, per-layer techniques and steps,
/// input images, a direction and a dataset.
fn valid_spec() -> JobSpec {
    let mut settings = RenderSettings { steps: 8, size: 32, input_size: 32, ..Default::default() };
    settings.options.caricature_inputs = vec![NamedImage { name: "cat".into(), uri: "s3://models/inputs/cat.jpg".into() }];
    settings.options.deepdream_inputs = vec![NamedImage { name: "dog".into(), uri: "s3://models/inputs/dog.jpg".into() }];
    settings.options.directions = vec![Direction { name: "d0".into(), layer: "fc".into(), vector: vec![0.5, -1.0, 2.0] }];
    let mut conv = LayerPlan::new(LayerInfo { name: "conv".into(), shape: vec![8, 4, 4] }, UnitRanges::range(0, 8));
    conv.steps = Some(4);
    let mut fc = LayerPlan::new(LayerInfo { name: "fc".into(), shape: vec![3] }, UnitRanges::range(0, 3));
    fc.techniques = Some(vec![Technique::Channel, Technique::Caricature, Technique::DeepDream, Technique::Direction]);
    JobSpec {
        model: ModelRef { uri: "s3://models/m.pt".into(), name: "m".into(), sha256: String::new() },
        layers: vec![conv, fc],
        techniques: vec![Technique::Channel, Technique::Neuron],
        settings,
        batch: 4,
        out: "s3://atlas/run".into(),
        dataset: Some(DatasetSpec { uri: "s3://models/dataset/".into(), examples: 4, images_per_shard: 100, connections: true }),
    }
}

fn valid_json() -> String {
    serde_json::to_string(&valid_spec()).unwrap()
}

/// Reads and validates, as the coordinator does with a submitted spec.
fn decode(text: &str) {
    if let Ok(spec) = serde_json::from_str::<JobSpec>(text) {
        if spec.validate().is_ok() {
            serde_json::to_string(&spec).expect("an accepted spec serialises");
        }
    }
}

/// Every place in a JSON value, as a path of object keys and array indices.
fn places(value: &Value, here: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    let children: Vec<(String, &Value)> = match value {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(a) => a.iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect(),
        _ => Vec::new(),
    };
    for (key, child) in children {
        let mut path = here.clone();
        path.push(key);
        places(child, path, out);
    }
}

fn at_mut<'a>(value: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(value, |v, key| match v {
        Value::Object(m) => m.get_mut(key).unwrap(),
        Value::Array(a) => &mut a[key.parse::<usize>().unwrap()],
        _ => unreachable!("a path from `places` leads through objects and arrays"),
    })
}

/// Replacement values that stress a decoder: extremes, wrong types, empty containers.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(u32::MAX as u64), Just(u64::MAX), Just(0u64), Just(1 << 40)].prop_map(Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        Just(Value::Array(Vec::new())),
        Just(Value::Object(Default::default())),
        proptest::collection::vec(any::<u32>(), 0..4).prop_map(|v| Value::from(v)),
        proptest::collection::vec((any::<u32>(), any::<u32>()), 0..4).prop_map(|v| Value::from(v.into_iter().map(|(a, b)| vec![a, b]).collect::<Vec<_>>())),
    ]
}

#[test]
fn the_valid_spec_is_accepted() {
    let spec: JobSpec = serde_json::from_str(&valid_json()).unwrap();
    spec.validate().expect("the mutations start from a spec the validator accepts");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        decode(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn bytes_of_a_valid_spec_edited(edits in proptest::collection::vec((any::<usize>(), 0usize..8, "[\\[\\]{}\",:0-9a-z -]{0,4}"), 1..6)) {
        let mut text = valid_json().into_bytes();
        for (at, cut, insert) in edits {
            let at = at % (text.len() + 1);
            let end = (at + cut).min(text.len());
            text.splice(at..end, insert.into_bytes());
        }
        decode(&String::from_utf8_lossy(&text));
    }

    #[test]
    fn a_value_anywhere_replaced(choices in proptest::collection::vec((any::<usize>(), hostile_value()), 1..4)) {
        let mut value = serde_json::to_value(valid_spec()).unwrap();
        for (choice, replacement) in choices {
            let mut all = Vec::new();
            places(&value, Vec::new(), &mut all);
            let path = &all[choice % all.len()];
            *at_mut(&mut value, path) = replacement;
        }
        decode(&value.to_string());
    }
}
