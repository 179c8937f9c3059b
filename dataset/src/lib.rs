//! Dataset input for dataset examples, without libtorch.
//!
//! - [`plan`]: lists a dataset (a local directory or an S3 prefix of JPEG/PNG images or
//!   WebDataset `.tar` shards) into the [`ShardSource`]s of its map tasks.
//! - [`read_shard`]: fetches one shard's images as [`RawImage`]s.
//! - [`preprocess`]: the one decode-resize-crop that both the map (for the forward pass)
//!   and the reduce (for crops) use, so activation coordinates and crops line up.
//! - [`crop_jpeg`], [`thumbnail_jpeg`]: the example images written into the atlas.

use std::io::Cursor;

use image::imageops::{self, FilterType};
use image::{ImageBuffer, ImageReader, Rgb, RgbImage};
use loupe_core::store::ArtifactStore;
use loupe_core::task::ShardSource;

pub mod color;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The dataset as a whole is unusable (nothing to read, bad arguments).
    #[error("dataset {uri}: {message}")]
    Dataset { uri: String, message: String },
    /// An image key the plan named is gone.
    #[error("dataset image {key} is missing from {location}")]
    Missing { key: String, location: String },
    /// A `.tar` shard that is not a tar archive. A retry cannot fix this, so it should
    /// fail the job (report it as not retryable).
    #[error("shard {key} is not a tar archive: {reason}")]
    NotTar { key: String, reason: String },
    /// An image member whose header says it holds more than [`MAX_TAR_MEMBER_BYTES`]:
    /// not retryable either.
    #[error("shard {key}: member {member} holds {size} bytes, more than the {cap} an image may have")]
    MemberTooLarge { key: String, member: String, size: u64, cap: u64 },
    /// An image that cannot be decoded as JPEG or PNG: skip it and count it.
    #[error("image {id} cannot be decoded: {reason}")]
    Undecodable { id: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] loupe_core::Error),
}

impl Error {
    /// Whether a retry of the task could succeed: true only for store trouble (which may
    /// be transient). A missing image, a bad tar or an empty dataset stay so.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Error::Store(loupe_core::Error::Io { .. } | loupe_core::Error::Remote { .. })
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// One image of a shard, as fetched: `id` is its key, or `<tar key>/<member path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage {
    pub id: String,
    pub bytes: Vec<u8>,
}

impl RawImage {
    /// [`preprocess`], with the image's id in the error.
    pub fn preprocess(&self, input_size: u32) -> Result<Preprocessed> {
        preprocess(&self.bytes, input_size).map_err(|e| match e {
            Error::Undecodable { reason, .. } => Error::Undecodable {
                id: self.id.clone(),
                reason,
            },
            other => other,
        })
    }
}

fn lower_ext(key: &str) -> String {
    let name = key.rsplit('/').next().unwrap_or(key);
    name.rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default()
}

/// Whether a key or tar member names a JPEG or PNG image, by extension, in any case.
pub fn is_image_key(key: &str) -> bool {
    matches!(lower_ext(key).as_str(), "jpg" | "jpeg" | "png")
}

fn is_tar_key(key: &str) -> bool {
    lower_ext(key) == "tar"
}

/// Lists the dataset at `uri` into map-task shards: its JPEG/PNG files (`.jpg`, `.jpeg`,
/// `.png` in any case) in key order, `images_per_shard` to an [`ShardSource::Images`]
/// shard, then one [`ShardSource::Tar`] shard per `.tar` file, in key order. Other files
/// are ignored. The same listing always gives the same plan.
///
/// A dataset that is an atlas (an `atlas.json` at its root) is its rendered unit images
/// only, so a model with no dataset of its own can get statistics and connections over its
/// feature visualisations (docs/atlas-format.md "Connections").
pub async fn plan(uri: &str, images_per_shard: usize) -> Result<Vec<ShardSource>> {
    let fail = |message: String| Error::Dataset {
        uri: uri.to_string(),
        message,
    };
    if images_per_shard == 0 {
        return Err(fail("images per shard must be at least 1".to_string()));
    }
    let store = loupe_core::store::open(uri).await?;
    let mut keys = store.list("").await?;
    // Sorted by the store already; sorting here keeps the plan deterministic regardless.
    keys.sort();
    if keys.iter().any(|k| k == "atlas.json") {
        keys.retain(|k| loupe_core::atlas::is_unit_image_key(k));
    }
    let (images, tars): (Vec<String>, Vec<String>) = keys
        .into_iter()
        .filter(|k| is_image_key(k) || is_tar_key(k))
        .partition(|k| is_image_key(k));
    if images.is_empty() && tars.is_empty() {
        return Err(fail(format!(
            "no images found at {}: looked for .jpg, .jpeg and .png files and WebDataset .tar shards",
            store.location()
        )));
    }
    let mut shards: Vec<ShardSource> = images
        .chunks(images_per_shard)
        .map(|c| ShardSource::Images { keys: c.to_vec() })
        .collect();
    shards.extend(tars.into_iter().map(|key| ShardSource::Tar { key }));
    Ok(shards)
}

/// How many image fetches of one shard are in flight at once: S3 latency, not bandwidth,
/// bounds a shard of small files.
const FETCH_CONCURRENCY: usize = 16;

/// Fetches one shard's images from `store` (the dataset's store): for an images shard
/// each key in order (a key that is gone is an error), for a tar shard every JPEG/PNG
/// regular file in archive order. Bytes are not decoded here: see [`preprocess`].
pub async fn read_shard(store: &dyn ArtifactStore, source: &ShardSource) -> Result<Vec<RawImage>> {
    match source {
        ShardSource::Images { keys } => {
            // In chunks joined at once rather than a buffered stream: a stream of
            // closures that borrow `store` makes the caller's future not Send
            // (rust-lang/rust#102211).
            let mut out = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(FETCH_CONCURRENCY) {
                let fetches = chunk.iter().map(|key| async move {
                    match store.get(key).await? {
                        Some(bytes) => Ok(RawImage { id: key.clone(), bytes }),
                        None => Err(Error::Missing { key: key.clone(), location: store.location() }),
                    }
                });
                out.extend(futures_util::future::try_join_all(fetches).await?);
            }
            Ok(out)
        }
        ShardSource::Tar { key } => {
            let bytes = store.get(key).await?.ok_or_else(|| Error::Missing {
                key: key.clone(),
                location: store.location(),
            })?;
            read_tar(key, &bytes)
        }
    }
}

/// The most bytes one member of a tar shard may hold. Dataset images are JPEGs and PNGs
/// of a few megabytes at most; a header claiming more is refused rather than trusted, so
/// a corrupt or hostile shard cannot make a worker allocate what its size field says.
pub const MAX_TAR_MEMBER_BYTES: u64 = 64 * 1024 * 1024;

/// The JPEG/PNG members of a tar archive held in memory.
fn read_tar(key: &str, bytes: &[u8]) -> Result<Vec<RawImage>> {
    read_tar_capped(key, bytes, MAX_TAR_MEMBER_BYTES)
}

/// [`read_tar`] with members of at most `cap` bytes; a larger one fails the shard with
/// an error naming it.
fn read_tar_capped(key: &str, bytes: &[u8], cap: u64) -> Result<Vec<RawImage>> {
    let not_tar = |e: std::io::Error| Error::NotTar {
        key: key.to_string(),
        reason: e.to_string(),
    };
    let mut archive = tar::Archive::new(Cursor::new(bytes));
    let mut out = Vec::new();
    for entry in archive.entries().map_err(not_tar)? {
        let mut entry = entry.map_err(not_tar)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(not_tar)?
            .to_string_lossy()
            .into_owned();
        let member = path.trim_start_matches("./");
        if !is_image_key(member) {
            continue;
        }
        if entry.size() > cap {
            return Err(Error::MemberTooLarge { key: key.to_string(), member: member.to_string(), size: entry.size(), cap });
        }
        // Not sized from the header: the buffer grows with the bytes really there, and
        // `take` bounds them by the cap whatever the archive reader does.
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut entry, cap), &mut data).map_err(not_tar)?;
        out.push(RawImage {
            id: format!("{key}/{member}"),
            bytes: data,
        });
    }
    Ok(out)
}

/// An image as the model sees it: `size` x `size` RGB, 8 bits a channel, row-major
/// (`rgb[(y * size + x) * 3 + c]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preprocessed {
    pub size: u32,
    pub rgb: Vec<u8>,
}

impl Preprocessed {
    /// The model's input: channels first (`[3, size, size]`, RGB), values in [0, 1].
    pub fn to_chw_f32(&self) -> Vec<f32> {
        let plane = (self.size * self.size) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = px[c] as f32 / 255.0;
            }
        }
        out
    }

    fn view(&self) -> ImageBuffer<Rgb<u8>, &[u8]> {
        ImageBuffer::from_raw(self.size, self.size, &self.rgb[..])
            .expect("a preprocessed image holds size*size*3 bytes")
    }
}

/// Images larger than this on a side are refused rather than decoded (a decompression
/// bomb must not take the worker's memory).
const MAX_SIDE: u32 = 16384;

/// Decodes a JPEG or PNG into 8-bit RGB, within the size limit; anything else is
/// [`Error::Undecodable`] under `id`.
pub(crate) fn decode_rgb(bytes: &[u8], id: &str) -> Result<image::RgbImage> {
    let undecodable = |reason: String| Error::Undecodable {
        id: id.to_string(),
        reason,
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| undecodable(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    if reader.format().is_none() {
        return Err(undecodable("not a JPEG or PNG file".to_string()));
    }
    let img = reader
        .decode()
        .map_err(|e| undecodable(e.to_string()))?
        .into_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(undecodable(format!("{w}x{h} image")));
    }
    Ok(img)
}

/// Decodes a JPEG or PNG, converts it to RGB (alpha is dropped, grey is spread over the
/// three channels), resizes it so that its shorter side is `input_size` (bilinear, i.e.
/// a triangle filter, antialiased when shrinking) and centre-crops `input_size` square.
/// A file that is not a decodable JPEG/PNG gives [`Error::Undecodable`] (use
/// [`RawImage::preprocess`] for the id in it).
pub fn preprocess(bytes: &[u8], input_size: u32) -> Result<Preprocessed> {
    if input_size == 0 {
        return Err(Error::Invalid(
            "the input size must be at least 1".to_string(),
        ));
    }
    let img = decode_rgb(bytes, "(unnamed)")?;
    let (w, h) = img.dimensions();
    // Scale so the shorter side is input_size; the longer side rounds to nearest.
    let s = input_size as u64;
    let (nw, nh) = if w <= h {
        (
            input_size,
            ((h as u64 * s + w as u64 / 2) / w as u64).max(s) as u32,
        )
    } else {
        (
            ((w as u64 * s + h as u64 / 2) / h as u64).max(s) as u32,
            input_size,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img
    } else {
        imageops::resize(&img, nw, nh, FilterType::Triangle)
    };
    let (x0, y0) = ((nw - input_size) / 2, (nh - input_size) / 2);
    let cropped = imageops::crop_imm(&resized, x0, y0, input_size, input_size).to_image();
    Ok(Preprocessed {
        size: input_size,
        rgb: cropped.into_raw(),
    })
}

/// The centre, in input pixels, of cell `pos` of a feature map `feature_len` cells long
/// over an input `input_size` pixels long: where a crop around that unit's maximum goes.
pub fn feature_to_pixel(pos: u32, feature_len: u32, input_size: u32) -> f32 {
    (pos as f32 + 0.5) * input_size as f32 / feature_len.max(1) as f32
}

fn encode_jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(img)
        .expect("encoding an RGB image of 1..=65535 px a side into memory cannot fail");
    out
}

/// Clamps an output side to what JPEG can hold.
fn jpeg_side(side: u32) -> u32 {
    side.clamp(1, 65535)
}

/// The square of `side` pixels centred on (`center_y`, `center_x`) (pixel coordinates of
/// the preprocessed image), moved to lie inside the image and shrunk only if `side` is
/// larger than the image, resized to `out_side` and encoded as a JPEG (quality 90).
pub fn crop_jpeg(
    img: &Preprocessed,
    center_y: f32,
    center_x: f32,
    side: u32,
    out_side: u32,
) -> Vec<u8> {
    let (x0, y0, side) = crop_box(img.size, center_y, center_x, side);
    let view = img.view();
    let region = RgbImage::from_fn(side, side, |x, y| *view.get_pixel(x0 + x, y0 + y));
    let out_side = jpeg_side(out_side);
    let region = if side == out_side {
        region
    } else {
        imageops::resize(&region, out_side, out_side, FilterType::Triangle)
    };
    encode_jpeg(&region)
}

/// The crop's top-left corner and side.
fn crop_box(size: u32, center_y: f32, center_x: f32, side: u32) -> (u32, u32, u32) {
    let side = side.clamp(1, size.max(1));
    let start = |c: f32| {
        let s = (c - side as f32 / 2.0).round();
        // NaN and out-of-range centres clamp to the edges as well.
        if s.is_nan() {
            0
        } else {
            (s.max(0.0) as u32).min(size - side)
        }
    };
    (start(center_x), start(center_y), side)
}

/// The whole preprocessed image, resized to `out_side`, as a JPEG (quality 90).
pub fn thumbnail_jpeg(img: &Preprocessed, out_side: u32) -> Vec<u8> {
    let out_side = jpeg_side(out_side);
    let thumb = if img.size == out_side {
        RgbImage::from_raw(img.size, img.size, img.rgb.clone())
            .expect("a preprocessed image holds size*size*3 bytes")
    } else {
        imageops::resize(&img.view(), out_side, out_side, FilterType::Triangle)
    };
    encode_jpeg(&thumb)
}

#[cfg(test)]
mod tests;
