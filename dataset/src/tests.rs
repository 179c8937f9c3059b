use super::*;
use image::ImageFormat;
use loupe_core::store::LocalStore;

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// `w` x `h`, the left half red and the right half blue.
fn red_blue(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    })
}

fn write(root: &std::path::Path, key: &str, bytes: &[u8]) {
    let path = root.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_size(0);
    b.append_data(&mut dir, "sub.png/", &[][..]).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test]
async fn an_atlas_as_a_dataset_is_its_rendered_unit_images() {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "atlas.json",
        "layers/conv1/units/0/channel.png",
        "layers/conv1/units/0/channel.step8.png",
        "layers/conv1/units/0/examples/top-00.jpg",
        "layers/conv1/units/1/diversity-0.png",
        "layers/conv1/deepdream/noise.png",
        "docs/screenshot.png",
    ] {
        write(dir.path(), key, b"x");
    }
    let keys = |k: &[&str]| ShardSource::Images { keys: k.iter().map(|k| k.to_string()).collect() };
    assert_eq!(
        plan(dir.path().to_str().unwrap(), 10).await.unwrap(),
        vec![keys(&["layers/conv1/units/0/channel.png", "layers/conv1/units/1/diversity-0.png"])]
    );
    // Without atlas.json the same files are an ordinary dataset: every image counts.
    std::fs::remove_file(dir.path().join("atlas.json")).unwrap();
    assert!(matches!(&plan(dir.path().to_str().unwrap(), 10).await.unwrap()[0], ShardSource::Images { keys } if keys.len() == 6));
}

#[tokio::test]
async fn plans_images_in_key_order_then_tars() {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "b.JPG",
        "a.png",
        "c.jpeg",
        "notes.txt",
        "sub/e.jpg",
        "shards/x.tar",
        "shards/A.TAR",
        "png",
        "d.gif",
    ] {
        write(dir.path(), key, b"x");
    }
    let uri = dir.path().to_str().unwrap();
    let images = |keys: &[&str]| ShardSource::Images {
        keys: keys.iter().map(|k| k.to_string()).collect(),
    };
    let tar = |key: &str| ShardSource::Tar {
        key: key.to_string(),
    };
    let plan2 = plan(uri, 2).await.unwrap();
    assert_eq!(
        plan2,
        vec![
            images(&["a.png", "b.JPG"]),
            images(&["c.jpeg", "sub/e.jpg"]),
            tar("shards/A.TAR"),
            tar("shards/x.tar")
        ]
    );
    assert_eq!(plan(uri, 2).await.unwrap(), plan2, "deterministic");
    assert_eq!(
        plan(uri, 3).await.unwrap()[..2],
        [
            images(&["a.png", "b.JPG", "c.jpeg"]),
            images(&["sub/e.jpg"])
        ]
    );
    assert_eq!(
        plan(&format!("file://{uri}"), 100).await.unwrap()[0],
        images(&["a.png", "b.JPG", "c.jpeg", "sub/e.jpg"])
    );
    let err = plan(uri, 0).await.unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}

#[tokio::test]
async fn an_empty_dataset_is_an_error_that_says_what_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "readme.txt", b"no images here");
    let uri = dir.path().to_str().unwrap().to_string();
    for u in [uri.clone(), format!("{uri}/does-not-exist")] {
        let err = plan(&u, 8).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Dataset { .. }), "{msg}");
        assert!(
            msg.contains(&u)
                && msg.contains(".jpg")
                && msg.contains(".png")
                && msg.contains(".tar"),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn reads_image_shards_in_order_and_names_a_missing_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/2.png", b"two");
    write(dir.path(), "a/1.png", b"one");
    let store = LocalStore::new(dir.path());
    let keys: Vec<String> = ["a/2.png", "a/1.png"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let got = read_shard(&store, &ShardSource::Images { keys: keys.clone() })
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            RawImage {
                id: "a/2.png".into(),
                bytes: b"two".to_vec()
            },
            RawImage {
                id: "a/1.png".into(),
                bytes: b"one".to_vec()
            }
        ]
    );
    let err = read_shard(
        &store,
        &ShardSource::Images {
            keys: vec!["a/1.png".into(), "a/gone.png".into()],
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::Missing { key, .. } if key == "a/gone.png"),
        "{err}"
    );
    assert!(!err.retryable());
}

#[tokio::test]
async fn reads_tar_members_in_archive_order() {
    let dir = tempfile::tempdir().unwrap();
    let tar = tar_of(&[
        ("./000.jpg", b"j0"),
        ("000.cls", b"3"),
        ("001.png", b"p1"),
        ("deep/002.JPEG", b"j2"),
        ("003.json", b"{}"),
    ]);
    write(dir.path(), "shards/s-0.tar", &tar);
    let store = LocalStore::new(dir.path());
    let got = read_shard(
        &store,
        &ShardSource::Tar {
            key: "shards/s-0.tar".into(),
        },
    )
    .await
    .unwrap();
    let ids: Vec<_> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "shards/s-0.tar/000.jpg",
            "shards/s-0.tar/001.png",
            "shards/s-0.tar/deep/002.JPEG"
        ]
    );
    assert_eq!(got[1].bytes, b"p1");
    // An archive without images is simply empty.
    write(dir.path(), "none.tar", &tar_of(&[("a.txt", b"x")]));
    assert!(read_shard(
        &store,
        &ShardSource::Tar {
            key: "none.tar".into()
        }
    )
    .await
    .unwrap()
    .is_empty());
}

#[tokio::test]
async fn a_tar_shard_that_is_not_a_tar_archive_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    let jpeg = encode(&red_blue(8, 8), ImageFormat::Jpeg);
    for (key, bytes) in [
        ("garbage.tar", vec![b'x'; 2048]),
        ("short.tar", b"not a tar".to_vec()),
        ("photo.tar", jpeg),
    ] {
        write(dir.path(), key, &bytes);
        let err = read_shard(&store, &ShardSource::Tar { key: key.into() })
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::NotTar { .. })
                && msg.contains(key)
                && msg.contains("is not a tar archive"),
            "{key}: {msg}"
        );
        assert!(!err.retryable());
    }
}

#[test]
fn corrupt_images_are_undecodable_with_their_id() {
    let png = encode(&red_blue(16, 16), ImageFormat::Png);
    for bytes in [
        b"definitely not an image".to_vec(),
        png[..png.len() / 2].to_vec(),
        Vec::new(),
        b"GIF89a....".to_vec(),
    ] {
        let raw = RawImage {
            id: "shard.tar/7.png".into(),
            bytes,
        };
        match raw.preprocess(32) {
            Err(Error::Undecodable { id, reason }) => {
                assert!(id == "shard.tar/7.png" && !reason.is_empty())
            }
            other => panic!("{other:?}"),
        }
    }
    let err = preprocess(b"junk", 32).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("image (unnamed) cannot be decoded"),
        "{err}"
    );
}

#[test]
fn preprocess_resizes_the_shorter_side_and_crops_the_centre() {
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        // 200x100 -> 100x50 -> columns 25..75 kept: 0..25 red, 25..50 blue.
        let p = preprocess(&encode(&red_blue(200, 100), format), 50).unwrap();
        assert_eq!(p.size, 50);
        assert_eq!(p.rgb.len(), 50 * 50 * 3);
        let px = |y: u32, x: u32| {
            let i = ((y * 50 + x) * 3) as usize;
            [p.rgb[i], p.rgb[i + 1], p.rgb[i + 2]]
        };
        let near = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(a, b)| a.abs_diff(b) <= 12);
        for y in [0, 25, 49] {
            for x in [0, 10, 22] {
                assert!(
                    near(px(y, x), [255, 0, 0]),
                    "{format:?} ({y},{x}) {:?}",
                    px(y, x)
                );
            }
            for x in [27, 40, 49] {
                assert!(
                    near(px(y, x), [0, 0, 255]),
                    "{format:?} ({y},{x}) {:?}",
                    px(y, x)
                );
            }
        }
    }
    // A tall image: 60x240 -> 30x120, rows 45..75 kept, all of them from the middle.
    let tall = RgbImage::from_fn(60, 240, |_, y| {
        if y < 60 {
            Rgb([0, 255, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let p = preprocess(&encode(&tall, ImageFormat::Png), 30).unwrap();
    assert_eq!(
        &p.rgb[..3],
        &[255, 255, 255],
        "rows 45..75 of 120 are rows 90..150 of 240: white"
    );
    // Grey with alpha becomes RGB; the model input is CHW in [0, 1].
    let ga = image::GrayAlphaImage::from_pixel(4, 4, image::LumaA([51, 10]));
    let mut bytes = Cursor::new(Vec::new());
    ga.write_to(&mut bytes, ImageFormat::Png).unwrap();
    let p = preprocess(bytes.get_ref(), 4).unwrap();
    assert_eq!(p.rgb, vec![51; 48]);
    let chw = p.to_chw_f32();
    assert_eq!(chw.len(), 48);
    assert!(chw.iter().all(|&v| v == 0.2));
}

#[test]
fn chw_is_channels_first() {
    let p = Preprocessed {
        size: 2,
        rgb: vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0],
    };
    assert_eq!(
        p.to_chw_f32(),
        vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    );
}

#[test]
fn crops_stay_inside_the_image() {
    assert_eq!(crop_box(100, 50.0, 50.0, 20), (40, 40, 20));
    assert_eq!(
        crop_box(100, 2.0, 98.0, 40),
        (60, 0, 40),
        "moved in from the top-right corner"
    );
    assert_eq!(crop_box(100, -30.0, 500.0, 40), (60, 0, 40));
    assert_eq!(
        crop_box(100, 50.0, 50.0, 300),
        (0, 0, 100),
        "shrunk to the image"
    );
    assert_eq!(crop_box(100, f32::NAN, 50.0, 10), (45, 0, 10));
    assert_eq!(crop_box(100, 50.0, 50.0, 0), (50, 50, 1));
    assert_eq!(feature_to_pixel(0, 7, 224), 16.0);
    assert_eq!(feature_to_pixel(6, 7, 224), 208.0);

    // Quadrants: red top-left, green top-right, blue bottom-left, white bottom-right.
    let quad = RgbImage::from_fn(64, 64, |x, y| match (x < 32, y < 32) {
        (true, true) => Rgb([255, 0, 0]),
        (false, true) => Rgb([0, 255, 0]),
        (true, false) => Rgb([0, 0, 255]),
        (false, false) => Rgb([255, 255, 255]),
    });
    let p = Preprocessed {
        size: 64,
        rgb: quad.into_raw(),
    };
    let decode = |b: Vec<u8>| {
        image::load_from_memory_with_format(&b, ImageFormat::Jpeg)
            .unwrap()
            .into_rgb8()
    };
    let crop = decode(crop_jpeg(&p, 1.0, 63.0, 16, 48));
    assert_eq!(crop.dimensions(), (48, 48));
    let c = crop.get_pixel(24, 24).0;
    assert!(
        c[0] < 30 && c[1] > 225 && c[2] < 30,
        "the top-right corner is green: {c:?}"
    );
    let crop = decode(crop_jpeg(&p, 60.0, 5.0, 8, 8));
    let c = crop.get_pixel(4, 4).0;
    assert!(
        c[0] < 30 && c[2] > 225,
        "the bottom-left corner is blue: {c:?}"
    );
    let thumb = decode(thumbnail_jpeg(&p, 32));
    assert_eq!(thumb.dimensions(), (32, 32));
    let c = thumb.get_pixel(28, 28).0;
    assert!(c.iter().all(|&v| v > 225), "white: {c:?}");
    assert_eq!(decode(thumbnail_jpeg(&p, 64)).dimensions(), (64, 64));
}

/// A tar whose one member's header claims `claimed` bytes, followed by only `present`
/// bytes of data: what a corrupt or hostile shard looks like.
fn lying_tar(member: &str, claimed: u64, present: usize) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(member).unwrap();
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(claimed);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend(std::iter::repeat_n(7u8, present));
    out
}

#[tokio::test]
async fn a_tar_member_larger_than_the_cap_fails_the_shard_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    // A header claiming a terabyte over a few bytes of data: trusted, it would be one
    // allocation of a terabyte.
    write(dir.path(), "lying.tar", &lying_tar("big/0001.jpg", 1 << 40, 600));
    let err = read_shard(&store, &ShardSource::Tar { key: "lying.tar".into() }).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::MemberTooLarge { size: 1099511627776, cap: MAX_TAR_MEMBER_BYTES, .. })
            && msg.contains("lying.tar")
            && msg.contains("big/0001.jpg"),
        "{msg}"
    );
    assert!(!err.retryable());
    // A member really over a (small) cap, and one just at it.
    let jpeg = encode(&red_blue(8, 8), ImageFormat::Jpeg);
    let shard = tar_of(&[("a.jpg", &jpeg[..]), ("b.jpg", &jpeg[..])]);
    let cap = jpeg.len() as u64;
    assert_eq!(read_tar_capped("s.tar", &shard, cap).unwrap().len(), 2);
    let err = read_tar_capped("s.tar", &shard, cap - 1).unwrap_err().to_string();
    assert!(err.contains("s.tar") && err.contains("a.jpg") && err.contains(&format!("more than the {}", cap - 1)), "{err}");
}

/// Property tests of the tar reader on what a shard may really hold: arbitrary bytes,
/// and a valid shard truncated, with header bytes flipped or with a size field set to
/// anything. None may panic, return more bytes than the shard holds, or return a member
/// over the cap; a failure names the shard.
mod tar_properties {
    use super::*;
    use proptest::prelude::*;

    const CAP: u64 = 4096;

    fn valid_shard() -> Vec<u8> {
        let png = encode(&red_blue(4, 4), ImageFormat::Png);
        tar_of(&[("0001.png", &png[..]), ("0001.cls", b"3"), ("0002.jpg", &[9u8; 3000][..])])
    }

    fn check(bytes: &[u8]) {
        match read_tar_capped("shard.tar", bytes, CAP) {
            Ok(images) => {
                let total: usize = images.iter().map(|i| i.bytes.len()).sum();
                assert!(total <= bytes.len(), "{total} bytes out of a {}-byte shard", bytes.len());
                assert!(images.iter().all(|i| i.bytes.len() as u64 <= CAP && i.id.starts_with("shard.tar/")));
            }
            Err(e @ (Error::NotTar { .. } | Error::MemberTooLarge { .. })) => assert!(e.to_string().contains("shard.tar"), "{e}"),
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            check(&bytes);
        }

        #[test]
        fn a_truncated_shard(cut in 0usize..8192) {
            let shard = valid_shard();
            check(&shard[..cut.min(shard.len())]);
        }

        #[test]
        fn flipped_bytes(flips in proptest::collection::vec((0usize..8192, any::<u8>()), 1..8)) {
            let mut shard = valid_shard();
            let len = shard.len();
            for (at, xor) in flips {
                shard[at % len] ^= xor;
            }
            check(&shard);
        }

        #[test]
        fn any_size_in_a_header(size in any::<u64>(), member in 0usize..3, checksum_fixed in any::<bool>()) {
            let mut shard = valid_shard();
            // Each member here takes one header block and its data blocks; find the
            // member-th header by walking the valid shard.
            let mut at = 0;
            for _ in 0..member {
                let h = tar::Header::from_byte_slice(&shard[at..at + 512]);
                at += 512 + (h.size().unwrap() as usize).div_ceil(512) * 512;
            }
            let mut h = tar::Header::from_byte_slice(&shard[at..at + 512]).clone();
            h.set_size(size);
            if checksum_fixed {
                h.set_cksum();
            }
            shard[at..at + 512].copy_from_slice(h.as_bytes());
            check(&shard);
        }
    }
}
