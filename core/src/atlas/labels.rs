//! Researchers' labels of units (`loupe label`): each label is its own file,
//! `labels/<layer>/<unit>.json`, and `labels.json` at the atlas root, which the viewer
//! reads, is rebuilt from those files after every write. Two researchers labelling at once
//! write different files, so neither loses the other's label, as job manifests feed
//! `atlas.json` (docs/atlas-format.md "Labels").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{layer_segment, Atlas, FORMAT_VERSION};
use crate::{Error, Result};

/// What the viewer reads: every label, by layer name and unit.
pub const LABELS_KEY: &str = "labels.json";
/// Where the label files are, one per labelled unit.
pub const LABEL_FILES: &str = "labels/";
/// The longest label, in characters: a name or a sentence, not notes.
pub const MAX_LABEL_CHARS: usize = 1000;

/// The key of a unit's label file: `labels/<layer segment>/<unit>.json`.
pub fn label_key(segment: &str, unit: u32) -> String {
    format!("{LABEL_FILES}{segment}/{unit}.json")
}

/// A unit's label file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    pub layer: String,
    pub unit: u32,
    pub text: String,
    /// RFC 3339, UTC; when the label was last written.
    pub updated: String,
}

/// `labels.json`: the label files merged, text by unit by layer name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    pub format_version: u32,
    pub labels: BTreeMap<String, BTreeMap<u32, String>>,
}

/// A label's text as kept: trimmed, at most [`MAX_LABEL_CHARS`] characters, on one line
/// and without control characters, since the viewer shows it in lists and titles.
fn label_text(text: &str) -> Result<&str> {
    let text = text.trim();
    let chars = text.chars().count();
    if chars > MAX_LABEL_CHARS {
        return Err(Error::invalid("label", format!("the label is {chars} characters long; at most {MAX_LABEL_CHARS} are kept")));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(Error::invalid("label", format!("the label has the control character {c:?}; write it on one line, without tabs")));
    }
    Ok(text)
}

impl Atlas {
    /// Labels unit `unit` of layer `layer` with `text` (trimmed), or removes its label when
    /// the text is empty, then rebuilds `labels.json`. Returns the label written, `None`
    /// when removed. The layer must be one of `atlas.json`'s and the unit within it.
    pub async fn set_label(&self, layer: &str, unit: u32, text: &str) -> Result<Option<Label>> {
        let text = label_text(text)?;
        let Some(manifest) = self.manifest().await? else {
            return Err(Error::invalid("atlas", format!("{} has no atlas.json: there is no atlas there to label", self.location())));
        };
        let Some(entry) = manifest.layers.iter().find(|l| l.name == layer) else {
            let names: Vec<&str> = manifest.layers.iter().map(|l| l.name.as_str()).collect();
            return Err(Error::invalid("layer", format!("the atlas at {} has no layer {layer:?}; its layers are {}", self.location(), names.join(", "))));
        };
        if unit >= entry.units {
            return Err(Error::invalid("unit", format!("layer {layer:?} has {} units (0 to {}); there is no unit {unit}", entry.units, entry.units.saturating_sub(1))));
        }
        let key = label_key(&layer_segment(layer)?, unit);
        let label = if text.is_empty() {
            self.store().delete(&key).await?;
            None
        } else {
            let updated = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            let label = Label { layer: layer.to_string(), unit, text: text.to_string(), updated };
            self.store().put(&key, crate::to_json(&label)).await?;
            Some(label)
        };
        self.publish_labels().await?;
        Ok(label)
    }

    /// `labels.json` as the viewer reads it; `None` before the first label.
    pub async fn labels(&self) -> Result<Option<Labels>> {
        self.read_json(LABELS_KEY).await
    }

    /// Every label file merged. A file removed between the listing and its reading is a
    /// label removed meanwhile, so it is left out.
    async fn merged_labels(&self) -> Result<Labels> {
        let mut labels: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
        for key in self.store().list(LABEL_FILES).await? {
            let Some(label) = self.read_json::<Label>(&key).await? else { continue };
            labels.entry(label.layer).or_default().insert(label.unit, label.text);
        }
        Ok(Labels { format_version: FORMAT_VERSION, labels })
    }

    /// Writes the merged label files as `labels.json`, and merges again until nothing
    /// changed, as `atlas.json` is published: whichever writer writes `labels.json` last
    /// then has every label file written before it in.
    async fn publish_labels(&self) -> Result<()> {
        self.publish_merged(LABELS_KEY, || async { self.merged_labels().await.map(Some) }).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::atlas::{AtlasManifest, LayerEntry, ModelSummary, ATLAS_KEY};
    use crate::spec::{LayerInfo, RenderSettings, Technique};
    use crate::store::{ArtifactStore, LocalStore};

    /// An atlas of two layers, `conv` (4 units) and `blocks.0/fc` (3 units), as a job
    /// leaves `atlas.json`.
    async fn atlas(store: Arc<dyn ArtifactStore>) -> Atlas {
        let layer = |name: &str, shape: Vec<i64>| LayerEntry::new(&LayerInfo { name: name.into(), shape }).unwrap();
        let manifest = AtlasManifest {
            format_version: FORMAT_VERSION,
            loupe_version: crate::LOUPE_VERSION.into(),
            model: ModelSummary { name: "m".into(), sha256: "abc".into() },
            settings: RenderSettings::default(),
            layers: vec![layer("conv", vec![4, 8, 8]), layer("blocks.0/fc", vec![3])],
            techniques: vec![Technique::Channel],
            created: "2026-01-01T00:00:00Z".into(),
            dataset: None,
        };
        store.put(ATLAS_KEY, crate::to_json(&manifest)).await.unwrap();
        Atlas::new(store)
    }

    fn local() -> (tempfile::TempDir, Arc<dyn ArtifactStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        (dir, store)
    }

    async fn labels_json(atlas: &Atlas) -> serde_json::Value {
        serde_json::from_slice(&atlas.store().get(LABELS_KEY).await.unwrap().expect("labels.json")).unwrap()
    }

    /// A label is written trimmed to its file and to labels.json; labelling again replaces
    /// it; an empty text removes both.
    #[tokio::test]
    async fn labels_are_set_replaced_and_removed() {
        let (_dir, store) = local();
        let atlas = atlas(store).await;
        assert_eq!(atlas.labels().await.unwrap(), None, "no labels.json before the first label");

        let label = atlas.set_label("conv", 2, "  curve detector \n").await.unwrap().unwrap();
        assert_eq!((label.layer.as_str(), label.unit, label.text.as_str()), ("conv", 2, "curve detector"));
        atlas.set_label("blocks.0/fc", 0, "dog ears").await.unwrap();
        let file: Label = serde_json::from_slice(&atlas.store().get("labels/conv/2.json").await.unwrap().unwrap()).unwrap();
        assert_eq!(file, label);
        assert!(atlas.store().get("labels/blocks.0%2Ffc/0.json").await.unwrap().is_some(), "the file is under the layer's segment");
        assert_eq!(
            labels_json(&atlas).await,
            serde_json::json!({ "format_version": 1, "labels": { "conv": { "2": "curve detector" }, "blocks.0/fc": { "0": "dog ears" } } })
        );

        atlas.set_label("conv", 2, "curves, high-low").await.unwrap();
        assert_eq!(labels_json(&atlas).await["labels"]["conv"], serde_json::json!({ "2": "curves, high-low" }));

        assert_eq!(atlas.set_label("conv", 2, "   ").await.unwrap(), None);
        assert!(atlas.store().get("labels/conv/2.json").await.unwrap().is_none());
        assert_eq!(labels_json(&atlas).await["labels"], serde_json::json!({ "blocks.0/fc": { "0": "dog ears" } }));
        assert_eq!(atlas.set_label("conv", 3, "").await.unwrap(), None, "removing a label that is not there is no error");
    }

    /// A layer the atlas does not have, a unit past the layer's, a text too long or with
    /// a control character, or no atlas at all: refused with a message naming the problem,
    /// and nothing written.
    #[tokio::test]
    async fn bad_layers_units_and_texts_are_refused_and_write_nothing() {
        let (_dir, store) = local();
        let atlas = atlas(store).await;
        let refused = |r: Result<Option<Label>>| r.unwrap_err().to_string();
        let err = refused(atlas.set_label("conv9", 0, "x").await);
        assert!(err.contains("no layer \"conv9\"") && err.contains("conv, blocks.0/fc"), "{err}");
        let err = refused(atlas.set_label("conv", 4, "x").await);
        assert!(err.contains("4 units") && err.contains("no unit 4"), "{err}");
        let err = refused(atlas.set_label("conv", 0, &"a".repeat(MAX_LABEL_CHARS + 1)).await);
        assert!(err.contains("1001 characters"), "{err}");
        assert!(atlas.set_label("conv", 0, &"é".repeat(MAX_LABEL_CHARS)).await.is_ok(), "the limit counts characters, not bytes");
        atlas.set_label("conv", 0, "").await.unwrap();
        let err = refused(atlas.set_label("conv", 0, "two\nlines").await);
        assert!(err.contains("control character '\\n'"), "{err}");
        let err = refused(atlas.set_label("conv", 0, "a\u{7}").await);
        assert!(err.contains("control character"), "{err}");
        assert!(atlas.store().list(LABEL_FILES).await.unwrap().is_empty());
        assert_eq!(labels_json(&atlas).await["labels"], serde_json::json!({}), "only the label set and removed above was written");

        let empty = tempfile::tempdir().unwrap();
        let err = refused(Atlas::new(Arc::new(LocalStore::new(empty.path()))).set_label("conv", 0, "x").await);
        assert!(err.contains("no atlas.json"), "{err}");
        assert!(std::fs::read_dir(empty.path()).unwrap().next().is_none(), "nothing written where there is no atlas");
    }

    /// A store that holds back the first write of labels.json: it says when that write is
    /// reached, and makes it once told to.
    struct HeldBack {
        inner: Arc<dyn ArtifactStore>,
        gate: tokio::sync::Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::sync::oneshot::Receiver<()>)>>,
    }

    #[async_trait::async_trait]
    impl ArtifactStore for HeldBack {
        async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
            if key == LABELS_KEY {
                if let Some((reached, go)) = self.gate.lock().await.take() {
                    reached.send(()).unwrap();
                    go.await.unwrap();
                }
            }
            self.inner.put(key, bytes).await
        }
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
            self.inner.get(key).await
        }
        async fn size(&self, key: &str) -> Result<Option<u64>> {
            self.inner.size(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<()> {
            self.inner.delete(key).await
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    /// Two researchers label different units at once, in the worst order: the first has
    /// merged the label files before the second wrote its own, and writes labels.json
    /// after the second has finished. Both labels must be in it.
    #[tokio::test]
    async fn two_writers_at_once_both_end_in_labels_json() {
        let (_dir, store) = local();
        let atlas = atlas(store.clone()).await;
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (go, go_rx) = tokio::sync::oneshot::channel();
        let held = Atlas::new(Arc::new(HeldBack { inner: store, gate: tokio::sync::Mutex::new(Some((reached_tx, go_rx))) }));
        let first = tokio::spawn(async move { held.set_label("conv", 0, "first").await });
        let deadline = std::time::Duration::from_secs(60);
        tokio::time::timeout(deadline, reached).await.expect("the first writer reached labels.json").unwrap();
        atlas.set_label("conv", 1, "second").await.unwrap();
        go.send(()).unwrap();
        tokio::time::timeout(deadline, first).await.expect("the first writer finished").unwrap().unwrap();
        assert_eq!(labels_json(&atlas).await["labels"], serde_json::json!({ "conv": { "0": "first", "1": "second" } }));
    }

    /// `writers` researchers at once, each labelling a unit of its own `rounds` times:
    /// every unit's last label must be in labels.json at the end.
    async fn concurrent_labels_are_all_kept(atlas: Atlas, writers: u32, rounds: u32) {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..writers {
            let atlas = atlas.clone();
            set.spawn(async move {
                for r in 0..rounds {
                    let (layer, unit) = if w % 2 == 0 { ("conv", w / 2) } else { ("blocks.0/fc", w / 2) };
                    atlas.set_label(layer, unit, &format!("writer {w} round {r}")).await.unwrap();
                }
            });
        }
        tokio::time::timeout(std::time::Duration::from_secs(120), async {
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("the writers finished");
        let labels = atlas.labels().await.unwrap().unwrap().labels;
        let mut want: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
        for w in 0..writers {
            let layer = if w % 2 == 0 { "conv" } else { "blocks.0/fc" };
            want.entry(layer.into()).or_default().insert(w / 2, format!("writer {w} round {}", rounds - 1));
        }
        assert_eq!(labels, want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_labels_in_a_local_atlas_are_all_kept() {
        let (_dir, store) = local();
        concurrent_labels_are_all_kept(atlas(store).await, 6, 5).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_labels_in_an_s3_atlas_are_all_kept() {
        let server = loupe_testsupport::S3Server::start(&["atlas"]);
        let store = Arc::new(crate::s3::tests::store(&server, "atlas", "a"));
        concurrent_labels_are_all_kept(atlas(store).await, 6, 5).await;
    }
}
