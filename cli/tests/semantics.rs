//! Semantics end to end: the demo model (tools/make_demo_model.py) is trained on generated
//! colours and stripes, so the right picture for each class logit is known. Each check
//! must pass on the rendered image and fail on the unoptimised initial image.

mod common;
use common::*;

use loupe_core::spec::{RenderSettings, Technique};
use loupe_worker::render::{initial_images, RenderRequest, Subject};
use tch::Device;

/// Logit order of the demo model (models/demo/demo.json "classes").
const COLOURS: [(&str, u32); 4] = [("red", 0), ("green", 1), ("blue", 2), ("yellow", 3)];
/// stripes_θ: lines along (cos θ, sin θ), y up.
const STRIPES: [(f64, u32); 4] = [(0.0, 4), (45.0, 5), (90.0, 6), (135.0, 7)];
const SIZE: u32 = 64;
const ARGS: &[&str] = &["--layers", "logits", "--units", "0..8", "--techniques", "channel", "--steps", "256", "--size", "64", "--batch", "8", "--device", "cpu"];

/// The share of pixels in which the colour's channels are the brightest (for yellow, red
/// and green both above blue).
fn colour_share(rgb: &[u8], colour: &str) -> f64 {
    let brightest = rgb
        .chunks(3)
        .filter(|p| {
            let (r, g, b) = (p[0], p[1], p[2]);
            match colour {
                "red" => r > g && r > b,
                "green" => g > r && g > b,
                "blue" => b > r && b > g,
                "yellow" => r > b && g > b,
                _ => unreachable!(),
            }
        })
        .count();
    brightest as f64 / (rgb.len() / 3) as f64
}

/// The image shows the colour: its channels are the brightest in most pixels. Rendered
/// logits score 0.66 to 0.78 on both precisions (MACO's 1.00, its mean colour free); a
/// near-grey start a third or less. (A
/// margin of 0.1 between channel means, the check before, was too close to call for the
/// green logit, whose image also holds a purple patch: 0.121 in fp32, 0.099 in bf16 with
/// the AVX-512 BF16 kernels of an Intel Xeon.)
fn shows_colour(rgb: &[u8], colour: &str) -> bool {
    colour_share(rgb, colour) > 0.5
}

/// Grey levels of an RGB image, `[SIZE * SIZE]`, row-major, y down.
fn grey(rgb: &[u8]) -> Vec<f64> {
    rgb.chunks(3).map(|p| (p[0] as f64 + p[1] as f64 + p[2] as f64) / 765.0).collect()
}

/// `f` applied at every pixel of an image that wraps around: `f(at)` where `at(dr, dc)`
/// reads the pixel `dr` rows down and `dc` columns right.
fn each_pixel(img: &[f64], f: impl Fn(&dyn Fn(i64, i64) -> f64) -> f64) -> Vec<f64> {
    let n = SIZE as i64;
    (0..n * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            f(&|dr, dc| img[((r + dr).rem_euclid(n) * n + (c + dc).rem_euclid(n)) as usize])
        })
        .collect()
}

/// Gaussian blur, standard deviation `sigma` px, wrapping around, truncated at 3 sigma.
fn blur(img: &[f64], sigma: f64) -> Vec<f64> {
    let radius = (3.0 * sigma).ceil() as i64;
    let weights: Vec<f64> = (-radius..=radius).map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = weights.iter().sum();
    let along = |img: &[f64], rows: bool| {
        each_pixel(img, |at| (-radius..=radius).zip(&weights).map(|(d, w)| w * if rows { at(d, 0) } else { at(0, d) }).sum::<f64>() / total)
    };
    along(&along(img, true), false)
}

/// Share of the image's oriented structure at stripes of `degrees`: the structure tensor
/// of the grey image (Sobel gradients, y up, their products blurred over sigma 2 px)
/// gives each pixel a dominant gradient direction and a strength, the difference of its
/// eigenvalues, which is 0 where the gradients have no one direction; the share is the
/// strength whose direction lies within 22.5 degrees of the normal to lines at `degrees`.
/// It is measured where the image is, not over its spectrum: a MACO image's spectral
/// energy per orientation is fixed by its magnitude, and its orientation shows only in
/// the phases, which put the energy of each direction together into lines or scatter it.
fn orientation_share(rgb: &[u8], degrees: f64) -> f64 {
    let g = grey(rgb);
    let gx = each_pixel(&g, |at| (at(-1, 1) + 2.0 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2.0 * at(0, -1) + at(1, -1)));
    let gy = each_pixel(&g, |at| (at(-1, -1) + 2.0 * at(-1, 0) + at(-1, 1)) - (at(1, -1) + 2.0 * at(1, 0) + at(1, 1)));
    let product = |a: &[f64], b: &[f64]| blur(&a.iter().zip(b).map(|(x, y)| x * y).collect::<Vec<_>>(), 4.0);
    let (jxx, jyy, jxy) = (product(&gx, &gx), product(&gy, &gy), product(&gx, &gy));
    let normal = (degrees + 90.0) % 180.0;
    let (mut inside, mut total) = (0.0, 0.0);
    for i in 0..jxx.len() {
        let direction = (0.5 * (2.0 * jxy[i]).atan2(jxx[i] - jyy[i])).to_degrees().rem_euclid(180.0);
        let strength = (jxx[i] - jyy[i]).hypot(2.0 * jxy[i]);
        let diff = (direction - normal).abs();
        total += strength;
        if diff.min(180.0 - diff) <= 22.5 {
            inside += strength;
        }
    }
    inside / total
}

fn shows_stripes(rgb: &[u8], degrees: f64) -> bool {
    orientation_share(rgb, degrees) > 0.45
}

/// The variants of the render the checks run on, as job-file lines besides ARGS: lucid's
/// recipe, a crop schedule, additive noise (docs/techniques.md "Crops and noise"), and
/// MACO with the 1/f magnitude or the test dataset's (docs/techniques.md "MACO"; the
/// learning rate that bench/maco.sh found best of 1, 0.3 and 0.05).
const LUCID: &str = "";
const CROPS: &str = "[transforms]\ncrop = { start = 0.9, end = 0.5 }\n";
const NOISE: &str = "[transforms]\nnoise = 0.01\n";
const MACO: &str = "learning_rate = 0.3\n[param]\nmaco = true\n";

fn maco_with_dataset_magnitude() -> String {
    let dataset = fixture("dataset/images");
    format!("{MACO}magnitude_from_dataset = true\n[dataset]\nuri = {:?}\nexamples = 2\nconnections = false\n", dataset.to_string_lossy())
}

/// The unit's initial image under the settings the atlas was rendered with.
fn initial(unit: u32, settings: &RenderSettings) -> Vec<u8> {
    let req = RenderRequest { layer: "logits", technique: Technique::Channel, subjects: &[Subject::Unit(unit)], settings };
    initial_images(&req, Device::Cpu).remove(0).images.remove(0).bytes
}

/// Renders the demo logits at `precision` under `variant` (job-file lines) and checks
/// each against its class.
fn check_class_logits(precision: &str, variant: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    let spec = dir.path().join("variant.toml");
    std::fs::write(&spec, variant).unwrap();
    let spec = spec.to_string_lossy();
    let mut args = ARGS.to_vec();
    args.extend_from_slice(&["--precision", precision, "--spec", &spec]);
    assert_ok(&render(&demo_model(), &out, &args));
    let atlas: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("atlas.json")).unwrap()).unwrap();
    let settings: RenderSettings = serde_json::from_value(atlas["settings"].clone()).unwrap();
    let image = |unit: u32| {
        let (w, h, rgb) = read_png(&out.join(format!("layers/logits/units/{unit}/channel.png")));
        assert_eq!((w, h), (SIZE, SIZE));
        rgb
    };
    for (colour, unit) in COLOURS {
        let rgb = image(unit);
        assert!(shows_colour(&rgb, colour), "{precision}: logit {unit} ({colour}): share of pixels {}", colour_share(&rgb, colour));
        let start = initial(unit, &settings);
        assert!(!shows_colour(&start, colour), "the check must fail on the initial image: {}", colour_share(&start, colour));
    }
    for (degrees, unit) in STRIPES {
        let rgb = image(unit);
        let shares: Vec<f64> = STRIPES.iter().map(|(d, _)| orientation_share(&rgb, *d)).collect();
        assert!(shows_stripes(&rgb, degrees), "{precision}: logit {unit} (stripes at {degrees}°): shares of oriented structure at 0, 45, 90, 135° {shares:?}");
        let start = initial(unit, &settings);
        assert!(!shows_stripes(&start, degrees), "the check must fail on the initial image: {}", orientation_share(&start, degrees));
    }
}

#[test]
fn class_logits_show_their_colour_and_stripe_orientation() {
    check_class_logits("fp32", LUCID);
}

/// The quality guard of bf16: the same semantic checks pass with the model in bfloat16.
#[test]
fn class_logits_show_their_colour_and_stripe_orientation_in_bf16() {
    check_class_logits("bf16", LUCID);
}

/// The same checks pass with a crop schedule and with additive noise.
#[test]
fn class_logits_show_their_colour_and_stripe_orientation_with_crops() {
    check_class_logits("fp32", CROPS);
}

#[test]
fn class_logits_show_their_colour_and_stripe_orientation_with_noise() {
    check_class_logits("fp32", NOISE);
}

/// MACO: a flat colour from each channel's mean, stripes from the phases alone.
#[test]
fn class_logits_show_their_colour_and_stripe_orientation_with_maco() {
    check_class_logits("fp32", MACO);
}

#[test]
fn class_logits_show_their_colour_and_stripe_orientation_with_maco_and_the_datasets_magnitude() {
    check_class_logits("fp32", &maco_with_dataset_magnitude());
}

/// Diversity at its default penalty (relative to the objective, docs/techniques.md
/// "Diversity"): every image of every class logit still shows its class. With lucid's
/// penalty at 1e2, 20 of these 32 images did not (measured in docs/techniques.md).
#[test]
fn every_diversity_image_of_a_class_logit_shows_its_class() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    let args = ["--layers", "logits", "--units", "0..8", "--techniques", "diversity", "--steps", "256", "--size", "64", "--batch", "8", "--device", "cpu"];
    assert_ok(&render(&demo_model(), &out, &args));
    let image = |unit: u32, i: u32| read_png(&out.join(format!("layers/logits/units/{unit}/diversity-{i}.png"))).2;
    for i in 0..4 {
        for (colour, unit) in COLOURS {
            let rgb = image(unit, i);
            assert!(shows_colour(&rgb, colour), "logit {unit} ({colour}), diversity image {i}: share of pixels {}", colour_share(&rgb, colour));
        }
        for (degrees, unit) in STRIPES {
            let rgb = image(unit, i);
            assert!(shows_stripes(&rgb, degrees), "logit {unit} (stripes at {degrees}°), diversity image {i}: share {}", orientation_share(&rgb, degrees));
        }
    }
}
