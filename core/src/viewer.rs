//! The atlas viewer (`viewer/` in the repository): static HTML, CSS and JavaScript,
//! embedded here and written to the root of every atlas when a job starts, so an atlas
//! carries the viewer version that wrote it and any static file server shows it.

/// (key at the atlas root, contents).
pub const FILES: [(&str, &[u8]); 3] = [
    ("index.html", include_bytes!("../../viewer/index.html")),
    ("viewer.js", include_bytes!("../../viewer/viewer.js")),
    ("viewer.css", include_bytes!("../../viewer/viewer.css")),
];

/// Writes the viewer into the atlas.
pub async fn write(store: &dyn crate::store::ArtifactStore) -> crate::Result<()> {
    for (key, bytes) in FILES {
        store.put(key, bytes.to_vec()).await?;
    }
    Ok(())
}
