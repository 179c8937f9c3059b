//! A dataset's colour correlation square root, for decorrelated-colour feature
//! visualisation (lucid `optvis/param/color.py`, captum `optim/_utils/image/dataset.py`).
//!
//! The renderer parameterises an image in a decorrelated colour space `t` and maps each
//! pixel back with `rgb = M @ t`, where `M M^T` is the RGB covariance of the dataset the
//! model was trained on. [`color_correlation_sqrt`] computes `M = U diag(sqrt(S))` from
//! the eigendecomposition `C = U diag(S) U^T` of that covariance, as captum's
//! `cov_matrix_to_klt` does with an SVD (for a symmetric positive semi-definite matrix
//! the two coincide). Rows are R, G, B, as in lucid's `color_correlation_svd_sqrt`
//! (`[[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]`); the renderer
//! normalises by the largest column norm itself.

// 3x3 matrix code reads best with explicit indices.
#![allow(clippy::needless_range_loop)]


use image::RgbImage;

use crate::{plan, read_shard, Error, Result};

/// Each image contributes at most this many pixels a side: pixels are taken every
/// `k`-th column and row, with `k = ceil(max(width, height) / SAMPLE_SIDE)`.
///
/// Subsampling rather than resizing keeps the pixel values as they are (a resize
/// averages neighbours, which shrinks the variance of fine texture and noise).
pub const SAMPLE_SIDE: u32 = 64;

/// Added to each eigenvalue before its square root, as captum's `cov_matrix_to_klt`
/// (`torch.sqrt(S + epsilon)`, `epsilon = 1e-10`). Eigenvalues that come out slightly
/// negative from rounding are first clamped to 0.
pub const EIGEN_EPSILON: f64 = 1e-10;

/// How many image keys are fetched per read while looking for decodable images.
const IMAGES_PER_READ: usize = 64;

/// The colour correlation square root of the dataset at `uri` (a directory or an S3
/// prefix, listed as [`plan`] does: image files in key order, then `.tar` shards in key
/// order, each in archive order).
///
/// Uses the first `max_images` images that decode as JPEG/PNG; undecodable ones are
/// skipped (a missing key, a `.tar` that is not a tar archive and store trouble are
/// errors). The covariance is the sample covariance (divided by `n - 1`) of the RGB
/// values in [0, 1] of all sampled pixels of those images pooled together, each image
/// sampled on a grid of at most [`SAMPLE_SIDE`] x [`SAMPLE_SIDE`] pixels (see there),
/// accumulated in f64. Note that captum's `dataset_cov_matrix` instead averages each
/// image's own covariance (about its own mean), which leaves out the colour variation
/// between images; the pooled covariance here includes it.
///
/// Returns `M = U diag(sqrt(S + 1e-10))` with rows R, G, B (so `pixel = M @ t` and
/// `M M^T` is the covariance), eigenvalues in descending order, each column's sign
/// chosen as lucid's are (R positive; see [`symmetric_eigen`]).
pub async fn color_correlation_sqrt(uri: &str, max_images: usize) -> Result<[[f32; 3]; 3]> {
    let fail = |message: String| Error::Dataset {
        uri: uri.to_string(),
        message,
    };
    if max_images == 0 {
        return Err(fail(
            "the colour correlation needs at least 1 image".to_string(),
        ));
    }
    let shards = plan(uri, IMAGES_PER_READ).await?;
    let store = loupe_core::store::open(uri).await?;
    let mut acc = CovAccumulator::default();
    let (mut used, mut skipped) = (0usize, 0usize);
    'shards: for shard in &shards {
        for raw in read_shard(store.as_ref(), shard).await? {
            match crate::decode_rgb(&raw.bytes, &raw.id) {
                Ok(img) => {
                    acc.add_image(&img);
                    used += 1;
                    if used == max_images {
                        break 'shards;
                    }
                }
                Err(Error::Undecodable { .. }) => skipped += 1,
                Err(e) => return Err(e),
            }
        }
    }
    if used == 0 {
        return Err(fail(format!(
            "none of its {skipped} images could be decoded as JPEG or PNG, so there is no colour correlation to compute"
        )));
    }
    let cov = acc.covariance().ok_or_else(|| {
        fail("its images hold a single pixel in all, too few for a covariance".to_string())
    })?;
    let m = sqrt_from_covariance(&cov);
    Ok(m.map(|row| row.map(|v| v as f32)))
}


/// Sums for a pooled RGB covariance. Values are accumulated as integers of 8-bit pixel
/// values (exact), and converted to [0, 1] once at the end in f64.
#[derive(Debug, Default, Clone)]
struct CovAccumulator {
    n: u64,
    sum: [u64; 3],
    /// Upper triangle of the sums of products, `[i][j]` for `i <= j`.
    prod: [[u64; 3]; 3],
}

impl CovAccumulator {
    fn add_pixel(&mut self, px: [u8; 3]) {
        self.n += 1;
        for i in 0..3 {
            let a = px[i] as u64;
            self.sum[i] += a;
            for j in i..3 {
                self.prod[i][j] += a * px[j] as u64;
            }
        }
    }

    /// Every `k`-th pixel of every `k`-th row, starting at (0, 0); see [`SAMPLE_SIDE`].
    fn add_image(&mut self, img: &RgbImage) {
        let (w, h) = img.dimensions();
        let k = w.max(h).div_ceil(SAMPLE_SIDE).max(1);
        for y in (0..h).step_by(k as usize) {
            for x in (0..w).step_by(k as usize) {
                self.add_pixel(img.get_pixel(x, y).0);
            }
        }
    }

    /// The sample covariance (`/ (n - 1)`) of the values in [0, 1]; `None` below 2 pixels.
    fn covariance(&self) -> Option<[[f64; 3]; 3]> {
        if self.n < 2 {
            return None;
        }
        let n = self.n as f64;
        let scale = 255.0f64 * 255.0;
        let mut c = [[0f64; 3]; 3];
        for i in 0..3 {
            for j in i..3 {
                // Exact integer arithmetic until the division: n*sum(ab) - sum(a)sum(b)
                // fits in u128 for any realistic pixel count.
                let num = self.n as u128 * self.prod[i][j] as u128;
                let sub = self.sum[i] as u128 * self.sum[j] as u128;
                let centred = if num >= sub {
                    (num - sub) as f64
                } else {
                    -((sub - num) as f64)
                };
                let v = centred / (n * (n - 1.0)) / scale;
                c[i][j] = v;
                c[j][i] = v;
            }
        }
        Some(c)
    }
}

/// `M = U diag(sqrt(max(S, 0) + EIGEN_EPSILON))` for the symmetric PSD `cov`, with the
/// ordering and sign conventions of [`symmetric_eigen`].
pub fn sqrt_from_covariance(cov: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let (s, u) = symmetric_eigen(cov);
    let mut m = [[0f64; 3]; 3];
    for (k, &sk) in s.iter().enumerate() {
        let r = (sk.max(0.0) + EIGEN_EPSILON).sqrt();
        for i in 0..3 {
            m[i][k] = u[i][k] * r;
        }
    }
    m
}

/// Eigenvector components smaller than this (in magnitude, of a unit vector) are taken
/// as rounding noise by the sign rule of [`symmetric_eigen`].
pub const SIGN_MIN: f64 = 1e-6;

/// The eigendecomposition `a = U diag(S) U^T` of a symmetric 3x3 matrix by cyclic Jacobi
/// rotations (f64). Returns `(S, U)` with the eigenvalues in descending order and the
/// eigenvectors as the matching columns of `U` (`U[i][k]` is component `i` of vector
/// `k`), each vector's sign chosen so that its first component (R, else G, else B) of
/// magnitude at least [`SIGN_MIN`] is positive. Only the upper triangle of `a` is read.
///
/// The sign rule is lucid's: every column of its `color_correlation_svd_sqrt` has a
/// positive R. A "largest component positive" rule would be unstable on natural
/// images, whose second component is about (R - B) / sqrt(2), R and B near-tied.
pub fn symmetric_eigen(a: &[[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut a = [
        [a[0][0], a[0][1], a[0][2]],
        [a[0][1], a[1][1], a[1][2]],
        [a[0][2], a[1][2], a[2][2]],
    ];
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _sweep in 0..64 {
        let off = a[0][1] * a[0][1] + a[0][2] * a[0][2] + a[1][2] * a[1][2];
        let diag = a[0][0] * a[0][0] + a[1][1] * a[1][1] + a[2][2] * a[2][2];
        if off == 0.0 || off <= f64::EPSILON * f64::EPSILON * diag * 1e-4 {
            break;
        }
        for (p, q) in [(0usize, 1usize), (0, 2), (1, 2)] {
            let apq = a[p][q];
            if apq == 0.0 {
                continue;
            }
            // Rotation P (P_pp = P_qq = c, P_pq = s, P_qp = -s) with (P^T A P)_pq = 0:
            // t = tan(phi) is the smaller root of t^2 + 2 theta t - 1 = 0.
            let theta = (a[q][q] - a[p][p]) / (2.0 * apq);
            let t = if theta.abs() > 1e150 {
                0.5 / theta
            } else {
                let sign = if theta >= 0.0 { 1.0 } else { -1.0 };
                sign / (theta.abs() + (theta * theta + 1.0).sqrt())
            };
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            // A <- A P (columns p and q), then A <- P^T A (rows p and q).
            for row in a.iter_mut() {
                let (akp, akq) = (row[p], row[q]);
                row[p] = c * akp - s * akq;
                row[q] = s * akp + c * akq;
            }
            for k in 0..3 {
                let (apk, aqk) = (a[p][k], a[q][k]);
                a[p][k] = c * apk - s * aqk;
                a[q][k] = s * apk + c * aqk;
            }
            a[p][q] = 0.0;
            a[q][p] = 0.0;
            // V <- V P.
            for row in v.iter_mut() {
                let (vkp, vkq) = (row[p], row[q]);
                row[p] = c * vkp - s * vkq;
                row[q] = s * vkp + c * vkq;
            }
        }
    }
    let mut order = [0usize, 1, 2];
    // Descending; a stable sort keeps equal eigenvalues in their Jacobi order.
    order.sort_by(|&i, &j| a[j][j].total_cmp(&a[i][i]));
    let mut s = [0f64; 3];
    let mut u = [[0f64; 3]; 3];
    for (k, &src) in order.iter().enumerate() {
        s[k] = a[src][src];
        let col = [v[0][src], v[1][src], v[2][src]];
        // A unit vector has a component of at least 1/sqrt(3), so one always qualifies.
        let lead = col
            .iter()
            .find(|x| x.abs() >= SIGN_MIN)
            .copied()
            .unwrap_or(1.0);
        let sign = if lead < 0.0 { -1.0 } else { 1.0 };
        for i in 0..3 {
            u[i][k] = sign * col[i];
        }
    }
    (s, u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb};

    type M3 = [[f64; 3]; 3];

    fn mul(a: &M3, b: &M3) -> M3 {
        let mut c = [[0f64; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
            }
        }
        c
    }

    fn transpose(a: &M3) -> M3 {
        let mut t = [[0f64; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                t[i][j] = a[j][i];
            }
        }
        t
    }

    fn max_diff(a: &M3, b: &M3) -> f64 {
        let mut d = 0f64;
        for i in 0..3 {
            for j in 0..3 {
                d = d.max((a[i][j] - b[i][j]).abs());
            }
        }
        d
    }

    fn to_f64(m: &[[f32; 3]; 3]) -> M3 {
        m.map(|r| r.map(|v| v as f64))
    }

    /// A small deterministic generator (64-bit LCG, high bits).
    struct Lcg(u64);
    impl Lcg {
        fn next_u8(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 56) as u8
        }
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn sample_cov(pixels: &[[u8; 3]]) -> M3 {
        let n = pixels.len() as f64;
        let mut mean = [0f64; 3];
        for p in pixels {
            for c in 0..3 {
                mean[c] += p[c] as f64 / 255.0 / n;
            }
        }
        let mut cov = [[0f64; 3]; 3];
        for p in pixels {
            for i in 0..3 {
                for j in 0..3 {
                    cov[i][j] += (p[i] as f64 / 255.0 - mean[i]) * (p[j] as f64 / 255.0 - mean[j]);
                }
            }
        }
        cov.map(|r| r.map(|v| v / (n - 1.0)))
    }

    #[test]
    fn jacobi_reconstructs_a_symmetric_matrix_with_orthonormal_vectors() {
        let cases: [M3; 4] = [
            [[4.0, 1.0, -2.0], [1.0, 3.0, 0.5], [-2.0, 0.5, 5.0]],
            // lucid's ImageNet matrix times its transpose: a realistic covariance.
            mul(
                &[[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]],
                &transpose(&[[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]),
            ),
            // Rank 1 (R = G = B) and already diagonal, with a repeated eigenvalue.
            [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
            [[2.0, 0.0, 0.0], [0.0, 7.0, 0.0], [0.0, 0.0, 2.0]],
        ];
        for c in &cases {
            let (s, u) = symmetric_eigen(c);
            assert!(s[0] >= s[1] && s[1] >= s[2], "not descending: {s:?}");
            let d = [[s[0], 0.0, 0.0], [0.0, s[1], 0.0], [0.0, 0.0, s[2]]];
            let back = mul(&mul(&u, &d), &transpose(&u));
            assert!(max_diff(&back, c) < 1e-9, "U S U^T = {back:?} != {c:?}");
            let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
            assert!(
                max_diff(&mul(&transpose(&u), &u), &id) < 1e-12,
                "U not orthonormal: {u:?}"
            );
            for k in 0..3 {
                let col = [u[0][k], u[1][k], u[2][k]];
                let lead = col.iter().copied().find(|x| x.abs() >= SIGN_MIN).unwrap();
                assert!(
                    lead > 0.0,
                    "column {k} {col:?} has a negative leading component"
                );
            }
        }
        // Known eigenvalues of the first case: the trace and determinant are kept.
        let (s, _) = symmetric_eigen(&cases[0]);
        assert!((s.iter().sum::<f64>() - 12.0).abs() < 1e-12);
        assert_eq!(symmetric_eigen(&cases[3]).0, [7.0, 2.0, 2.0]);
        // Deterministic: the same input gives the same bits.
        assert_eq!(symmetric_eigen(&cases[1]), symmetric_eigen(&cases[1]));
    }

    #[test]
    fn sqrt_times_its_transpose_is_the_covariance() {
        let lucid = [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]];
        let cov = mul(&lucid, &transpose(&lucid));
        let m = sqrt_from_covariance(&cov);
        // M M^T = C + 1e-10 I (captum's epsilon).
        assert!(max_diff(&mul(&m, &transpose(&m)), &cov) < 1e-9);
        // lucid's matrix is (up to rounding to 2 decimals) such a square root: its
        // columns are orthogonal, so ours matches it column for column.
        assert!(max_diff(&m, &lucid) < 0.01, "{m:?} vs {lucid:?}");
        let psd = [[0.05, 0.04, 0.01], [0.04, 0.06, 0.02], [0.01, 0.02, 0.03]];
        let m = sqrt_from_covariance(&psd);
        assert!(max_diff(&mul(&m, &transpose(&m)), &psd) < 1e-9);
    }

    #[tokio::test]
    async fn correlated_synthetic_dataset_gives_equal_r_and_g_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Lcg(7);
        let mut pixels_used = Vec::new();
        let mut images = Vec::new();
        for (w, h) in [(20, 12), (16, 16), (9, 30), (24, 8)] {
            let img = RgbImage::from_fn(w, h, |_, _| {
                let r = rng.next_u8();
                let b = rng.next_u8();
                Rgb([r, r, b])
            });
            images.push(img);
        }
        // Listing order: a.png, b.png (undecodable, skipped), c.png, then the tar's
        // member; e.png is after the tar in key order but image files come first.
        std::fs::write(dir.path().join("a.png"), png(&images[0])).unwrap();
        std::fs::write(dir.path().join("b.png"), b"not a png").unwrap();
        std::fs::write(dir.path().join("c.png"), png(&images[1])).unwrap();
        std::fs::write(dir.path().join("z.png"), png(&images[2])).unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        let member = png(&images[3]);
        let mut header = tar::Header::new_gnu();
        header.set_size(member.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, "0001.png", &member[..])
            .unwrap();
        std::fs::write(dir.path().join("shard.tar"), tar.into_inner().unwrap()).unwrap();
        let uri = dir.path().to_str().unwrap();

        // All four (a, c, z, then the tar member); every image is under 64 px a side, so
        // every pixel counts.
        for img in &images {
            pixels_used.extend(img.pixels().map(|p| p.0));
        }
        let m = to_f64(&color_correlation_sqrt(uri, 100).await.unwrap());
        let cov = sample_cov(&pixels_used);
        assert!(
            max_diff(&mul(&m, &transpose(&m)), &cov) < 1e-6,
            "M M^T {:?} != {cov:?}",
            mul(&m, &transpose(&m))
        );
        for k in 0..3 {
            assert!(
                (m[0][k] - m[1][k]).abs() < 1e-4,
                "rows R and G differ: {m:?}"
            );
        }
        // One eigenvalue is 0 (R - G has no variance): the last column is ~0.
        assert!((0..3).all(|i| m[i][2].abs() < 1e-4), "{m:?}");

        // The first 2 decodable images in listing order: a and c (b is skipped).
        let first_two: Vec<[u8; 3]> = images[..2]
            .iter()
            .flat_map(|i| i.pixels().map(|p| p.0))
            .collect();
        let m2 = to_f64(&color_correlation_sqrt(uri, 2).await.unwrap());
        assert!(max_diff(&mul(&m2, &transpose(&m2)), &sample_cov(&first_two)) < 1e-6);
        assert!(max_diff(&m2, &m) > 1e-6, "max_images had no effect");
    }

    #[tokio::test]
    async fn large_images_are_subsampled_on_a_grid() {
        let dir = tempfile::tempdir().unwrap();
        // 130 x 65: k = ceil(130 / 64) = 3, so columns 0, 3, ..., 129 and rows 0, 3, ..., 63.
        let img = RgbImage::from_fn(130, 65, |x, y| {
            Rgb([(x * 7 % 256) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
        });
        std::fs::write(dir.path().join("big.png"), png(&img)).unwrap();
        let mut sampled = Vec::new();
        for y in (0..65).step_by(3) {
            for x in (0..130).step_by(3) {
                sampled.push(img.get_pixel(x, y).0);
            }
        }
        let m = to_f64(
            &color_correlation_sqrt(dir.path().to_str().unwrap(), 1)
                .await
                .unwrap(),
        );
        assert!(max_diff(&mul(&m, &transpose(&m)), &sample_cov(&sampled)) < 1e-6);
    }

    #[tokio::test]
    async fn no_decodable_image_is_an_error_naming_the_dataset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("broken.png"), b"\x89PNG but not really").unwrap();
        std::fs::write(dir.path().join("other.jpg"), b"nope").unwrap();
        let uri = dir.path().to_str().unwrap();
        let err = color_correlation_sqrt(uri, 10).await.unwrap_err();
        assert!(matches!(err, Error::Dataset { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(uri), "{text}");
        assert!(text.contains("2 images"), "{text}");

        let empty = tempfile::tempdir().unwrap();
        let uri = empty.path().to_str().unwrap();
        let text = color_correlation_sqrt(uri, 10)
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains(uri), "{text}");
        assert!(color_correlation_sqrt(dir.path().to_str().unwrap(), 0)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn fixture_images_matrix() {
        let uri = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/dataset/images"
        );
        let m = color_correlation_sqrt(uri, 1000).await.unwrap();
        println!("colour correlation sqrt of {uri}:");
        for row in &m {
            println!("  [{:>9.5}, {:>9.5}, {:>9.5}]", row[0], row[1], row[2]);
        }
        let norms: Vec<f32> = (0..3)
            .map(|k| (0..3).map(|i| m[i][k] * m[i][k]).sum::<f32>().sqrt())
            .collect();
        println!("  column norms {norms:?}");
        assert!(norms[0] >= norms[1] && norms[1] >= norms[2]);
        assert!(m.iter().flatten().all(|v| v.is_finite()));
    }
}
