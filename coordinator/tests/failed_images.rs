//! A job with an image whose optimisation diverged: it succeeds, and its status counts
//! the failed image, which its layer.json lists with the reason.

use std::sync::Arc;

use loupe_coordinator::state::{JobState, MemoryStateStore};
use loupe_coordinator::{Coordinator, CoordinatorConfig};
use loupe_core::atlas::{Atlas, ImageId, RenderedImage, Target};
use loupe_core::spec::{JobSpec, LayerInfo, LayerPlan, ModelRef, RenderSettings, Technique};
use loupe_core::task::Work;

#[tokio::test]
async fn a_job_with_a_diverged_image_succeeds_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.pt");
    std::fs::write(&model, b"not really torchscript").unwrap();
    let out = dir.path().join("atlas").to_string_lossy().into_owned();
    let spec = JobSpec {
        model: ModelRef { uri: model.to_string_lossy().into_owned(), name: "m".into(), sha256: String::new() },
        layers: vec![LayerPlan::new(LayerInfo { name: "conv".into(), shape: vec![4, 8, 8] }, vec![0, 1, 2, 3].into())],
        techniques: vec![Technique::Channel],
        settings: RenderSettings { steps: 4, size: 16, input_size: 16, ..Default::default() },
        batch: 2,
        out: out.clone(),
        dataset: None,
    };
    let c = Coordinator::new(Arc::new(MemoryStateStore::new()), CoordinatorConfig::default());
    let id = c.submit(spec).await.unwrap();
    let atlas = Atlas::open(&out).await.unwrap();
    // A worker's part: each unit's record, unit 2's a failure.
    while let Some(lease) = c.lease_for("w").await.unwrap() {
        let Work::Render { layer, technique, targets } = &lease.task.work else { panic!("a render job") };
        let settings = lease.job.settings_for(layer);
        for target in targets {
            let image = ImageId::new(layer, *technique, target.clone()).unwrap();
            if *target == Target::Unit(2) {
                atlas.write_failed(&image, "objective became NaN at step 3", &lease.job.model.sha256, &settings).await.unwrap();
            } else {
                let png = RenderedImage { pngs: vec![b"png".to_vec()], objectives: vec![1.0], snapshots: vec![], curve: vec![], diversity: None, dead: false };
                atlas.write_image(&image, &png, &lease.job.model.sha256, &settings).await.unwrap();
            }
        }
        c.complete_lease(&lease.lease_id).await.unwrap();
    }
    let st = c.status(&id).await.unwrap();
    assert_eq!((st.state, st.images_done, st.images_failed), (JobState::Succeeded, 4, 1));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("atlas/layers/conv/layer.json")).unwrap()).unwrap();
    assert_eq!(index["units"][2]["techniques"]["channel"]["failed"], "objective became NaN at step 3");
}
