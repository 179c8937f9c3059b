//! Property tests of a job spec as it arrives over gRPC: any bytes, and a valid spec's
//! encoding truncated or with bytes replaced, are decoded, converted and validated to a
//! spec or an error, never a panic.

use proptest::prelude::*;

use loupe_core::spec::{DatasetSpec, Direction, JobSpec, LayerInfo, LayerPlan, ModelRef, NamedImage, RenderSettings, Technique};
use loupe_core::units::UnitRanges;
use loupe_proto::{v1, Message};

fn valid_encoding() -> Vec<u8> {
    let mut settings = RenderSettings { steps: 8, size: 32, input_size: 32, ..Default::default() };
    settings.options.caricature_inputs = vec![NamedImage { name: "cat".into(), uri: "s3://models/inputs/cat.jpg".into() }];
    settings.options.directions = vec![Direction { name: "d0".into(), layer: "fc".into(), vector: vec![0.5, -1.0, 2.0] }];
    let mut fc = LayerPlan::new(LayerInfo { name: "fc".into(), shape: vec![3] }, UnitRanges::range(0, 3));
    fc.techniques = Some(vec![Technique::Channel, Technique::Caricature, Technique::Direction]);
    let spec = JobSpec {
        model: ModelRef { uri: "s3://models/m.pt".into(), name: "m".into(), sha256: String::new() },
        layers: vec![LayerPlan::new(LayerInfo { name: "conv".into(), shape: vec![8, 4, 4] }, UnitRanges::range(2, 6)), fc],
        techniques: vec![Technique::Channel],
        settings,
        batch: 4,
        out: "s3://atlas/run".into(),
        dataset: Some(DatasetSpec { uri: "s3://models/dataset/".into(), examples: 4, images_per_shard: 100, connections: true }),
    };
    spec.validate().expect("the mutations start from a valid spec");
    v1::JobSpec::from(&spec).encode_to_vec()
}

/// Decodes, converts and validates, as the coordinator's Submit does.
fn decode(bytes: &[u8]) {
    if let Ok(wire) = v1::JobSpec::decode(bytes) {
        if let Ok(spec) = JobSpec::try_from(wire) {
            let _ = spec.validate();
        }
    }
}

#[test]
fn the_valid_encoding_round_trips() {
    let spec = JobSpec::try_from(v1::JobSpec::decode(&valid_encoding()[..]).unwrap()).unwrap();
    spec.validate().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        decode(&bytes);
    }

    #[test]
    fn a_valid_encoding_truncated(cut in any::<usize>()) {
        let bytes = valid_encoding();
        decode(&bytes[..cut % (bytes.len() + 1)]);
    }

    #[test]
    fn a_valid_encoding_with_bytes_replaced(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut bytes = valid_encoding();
        let len = bytes.len();
        for (at, byte) in edits {
            bytes[at % len] = byte;
        }
        decode(&bytes);
    }
}
