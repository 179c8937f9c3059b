//! Job files: `loupe render --spec job.toml` and `loupe submit --spec job.toml` take
//! every setting from a TOML file (docs/job-files.md), and command-line flags override
//! it. An unknown key is an error that names it (serde's `deny_unknown_fields`).

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

use loupe_core::location::Location;
use loupe_core::spec::{DeadUnits, Direction, DiversityPenalty, NamedImage, ParamKind, Precision, Technique, TransformSettings};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub model: Option<String>,
    pub out: Option<String>,
    /// `"all"`, or a list of layer names.
    pub layers: Option<Layers>,
    pub units: Option<String>,
    #[serde(default, deserialize_with = "techniques")]
    pub techniques: Option<Vec<Technique>>,
    pub steps: Option<u32>,
    pub size: Option<u32>,
    pub input_size: Option<u32>,
    pub batch: Option<u32>,
    pub seed: Option<u64>,
    pub learning_rate: Option<f64>,
    #[serde(default, deserialize_with = "from_str")]
    pub precision: Option<Precision>,
    pub thresholds: Option<Vec<u32>>,
    pub dead_units: Option<DeadUnits>,
    pub param: Option<ParamFile>,
    pub transforms: Option<TransformSettings>,
    pub diversity: Option<DiversityFile>,
    pub deepdream: Option<InputsFile>,
    pub caricature: Option<CaricatureFile>,
    pub direction: Option<DirectionOptionsFile>,
    #[serde(default)]
    pub directions: Vec<DirectionFile>,
    pub dataset: Option<DatasetFile>,
    /// Per-layer settings: `[[layer]]` tables.
    #[serde(default)]
    pub layer: Vec<LayerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    All(String),
    Names(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamFile {
    pub kind: Option<ParamKind>,
    pub decay: Option<f64>,
    pub decorrelate: Option<bool>,
    pub channels: Option<u32>,
    /// Rows R, G, B: pixel = matrix @ t.
    pub color_matrix: Option<[[f32; 3]; 3]>,
    /// Compute the colour matrix from the job's dataset.
    pub color_from_dataset: Option<bool>,
    /// MACO: fix the FFT's magnitude and optimise only its phase.
    pub maco: Option<bool>,
    /// MACO's fixed magnitude, a radial profile per channel.
    pub magnitude: Option<Vec<Vec<f32>>>,
    /// Compute MACO's magnitude from the job's dataset.
    pub magnitude_from_dataset: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiversityFile {
    pub images: Option<u32>,
    /// `relative` (the default) or `lucid`; each has its own default weight.
    pub penalty: Option<DiversityPenalty>,
    pub weight: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputsFile {
    #[serde(default)]
    pub inputs: Vec<NamedImage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaricatureFile {
    #[serde(default)]
    pub inputs: Vec<NamedImage>,
    pub cossim_pow: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectionOptionsFile {
    pub cossim_pow: Option<f64>,
}

/// A named direction: its values inline (`vector`) or in a `.npy` or `.json` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectionFile {
    pub name: String,
    pub layer: String,
    pub file: Option<PathBuf>,
    pub vector: Option<Vec<f32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetFile {
    pub uri: String,
    pub examples: Option<u32>,
    pub images_per_shard: Option<u32>,
    pub connections: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerFile {
    pub name: String,
    pub units: Option<String>,
    #[serde(default, deserialize_with = "techniques")]
    pub techniques: Option<Vec<Technique>>,
    pub steps: Option<u32>,
    /// Merged over the job's `[param]`, key by key.
    pub param: Option<ParamFile>,
    /// Merged over the job's `[transforms]`, key by key: kept as written until the job's
    /// transforms are known (`TransformSettings` checks its keys then).
    pub transforms: Option<toml::Table>,
}

impl JobFile {
    /// Reads a job file. Relative paths in it (model, out, inputs, direction files,
    /// dataset) are relative to the file's directory.
    pub fn read(path: &Path) -> Result<JobFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the job file {}", path.display()))?;
        let mut file: JobFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("job file {}: {}", path.display(), e.to_string().trim_end()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let in_file = || format!("job file {}", path.display());
        for (what, uri) in [("model", file.model.as_mut()), ("output", file.out.as_mut()), ("dataset", file.dataset.as_mut().map(|d| &mut d.uri))] {
            if let Some(uri) = uri {
                relative_to(base, what, uri).with_context(in_file)?;
            }
        }
        for list in [file.deepdream.as_mut().map(|d| &mut d.inputs), file.caricature.as_mut().map(|c| &mut c.inputs)].into_iter().flatten() {
            for i in list.iter_mut() {
                relative_to(base, "input image", &mut i.uri).with_context(in_file)?;
            }
        }
        for d in &mut file.directions {
            if let Some(f) = d.file.as_mut() {
                if f.is_relative() {
                    *f = base.join(&*f);
                }
            }
        }
        Ok(file)
    }

    /// The directions with their vectors read.
    pub fn directions(&self) -> Result<Vec<Direction>> {
        self.directions
            .iter()
            .map(|d| {
                let vector = match (&d.vector, &d.file) {
                    (Some(v), None) => v.clone(),
                    (None, Some(f)) => read_vector(f).with_context(|| format!("direction {:?}: reading {}", d.name, f.display()))?,
                    _ => bail!("direction {:?}: give exactly one of `vector` or `file`", d.name),
                };
                Ok(Direction { name: d.name.clone(), layer: d.layer.clone(), vector })
            })
            .collect()
    }
}

/// A local path made relative to `base` when it is relative; an S3 URI left as written.
fn relative_to(base: &Path, what: &'static str, uri: &mut String) -> Result<()> {
    if let Location::Local(path) = Location::parse(what, uri)? {
        if path.is_relative() {
            *uri = base.join(path).to_string_lossy().into_owned();
        }
    }
    Ok(())
}

/// A value parsed with its type's `FromStr`, whose error names the problem the way the
/// flag's does; the TOML error around it names the file, line and key.
fn from_str<'de, D: Deserializer<'de>, T: FromStr<Err: Display>>(d: D) -> std::result::Result<Option<T>, D::Error> {
    Option::<String>::deserialize(d)?.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
}

/// A list of techniques, refused when empty or with one twice, as `--techniques` is.
fn techniques<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<Technique>>, D::Error> {
    Option::<Vec<String>>::deserialize(d)?.map(|list| Technique::parse_list(&list.join(",")).map_err(serde::de::Error::custom)).transpose()
}

/// A direction vector from a `.npy` file (float32 or float64, one dimension, little
/// endian, C order) or a `.json` file (a list of numbers).
pub fn read_vector(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path)?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Ok(serde_json::from_slice::<Vec<f32>>(&bytes).context("expected a JSON list of numbers")?),
        Some("npy") => read_npy(&bytes),
        _ => bail!("a direction file must be .npy or .json"),
    }
}

/// The NumPy `.npy` format, versions 1 to 3: magic, version, header length, a Python
/// dict literal header, then the data.
fn read_npy(bytes: &[u8]) -> Result<Vec<f32>> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy file (no \\x93NUMPY magic)");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => bail!(".npy version {v} is not supported"),
    };
    let header = std::str::from_utf8(bytes.get(start..start + header_len).context("the .npy header is cut short")?)?;
    let field = |name: &str| -> Option<&str> {
        let rest = &header[header.find(&format!("'{name}'"))? + name.len() + 2..];
        Some(rest.trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr").and_then(|r| r.strip_prefix('\'')).and_then(|r| r.split('\'').next()).context("the .npy header has no descr")?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        bail!("a Fortran-ordered .npy is not supported");
    }
    let shape = field("shape").and_then(|r| r.strip_prefix('(')).and_then(|r| r.split(')').next()).context("the .npy header has no shape")?;
    let dims: Vec<usize> = shape.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse()).collect::<std::result::Result<_, _>>()?;
    if dims.len() != 1 {
        bail!("a direction must be one-dimensional; this array has shape {dims:?}");
    }
    let data = &bytes[start + header_len..];
    let values: Vec<f32> = match descr {
        "<f4" => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "<f8" => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        other => bail!("dtype {other} is not supported; save float32 or float64"),
    };
    if values.len() != dims[0] {
        bail!("the .npy holds {} values, but its shape says {}", values.len(), dims[0]);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn npy_vectors_of_float32_and_float64_are_read() {
        let f32s: Vec<u8> = [1.0f32, -2.5, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_npy(&npy("<f4", "(3,)", &f32s)).unwrap(), vec![1.0, -2.5, 0.0]);
        let f64s: Vec<u8> = [0.5f64, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_npy(&npy("<f8", "(2,)", &f64s)).unwrap(), vec![0.5, 4.0]);
        assert!(read_npy(&npy("<f4", "(1, 3)", &f32s)).unwrap_err().to_string().contains("one-dimensional"));
        assert!(read_npy(&npy("<i8", "(3,)", &f32s)).unwrap_err().to_string().contains("<i8"));
        assert!(read_npy(b"nonsense!!!").is_err());
    }

    #[test]
    fn an_unknown_key_is_named_with_its_place() {
        let err = toml::from_str::<JobFile>("steps = 10\n[param]\ndecai = 1.0\n").unwrap_err().to_string();
        assert!(err.contains("decai"), "{err}");
        let err = toml::from_str::<JobFile>("stepz = 10\n").unwrap_err().to_string();
        assert!(err.contains("stepz"), "{err}");
        let err = toml::from_str::<JobFile>("[[layer]]\nname = \"a\"\nsteps = \"many\"\n").unwrap_err().to_string();
        assert!(err.contains("steps") || err.contains("many"), "{err}");
    }

    #[test]
    fn precision_and_techniques_are_parsed_on_reading() {
        let file: JobFile = toml::from_str("precision = \"bf16\"\ntechniques = [\"channel\", \"deepdream\"]\n[[layer]]\nname = \"a\"\ntechniques = [\"neuron\"]\n").unwrap();
        assert_eq!(file.precision, Some(Precision::Bf16));
        assert_eq!(file.techniques, Some(vec![Technique::Channel, Technique::DeepDream]));
        assert_eq!(file.layer[0].techniques, Some(vec![Technique::Neuron]));
        let err = toml::from_str::<JobFile>("precision = \"fp16\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown precision \"fp16\"") && err.contains("line 1"), "{err}");
        let err = toml::from_str::<JobFile>("techniques = [\"channel\", \"channel\"]\n").unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
        let err = toml::from_str::<JobFile>("[[layer]]\nname = \"a\"\ntechniques = []\n").unwrap_err().to_string();
        assert!(err.contains("no technique given") && err.contains("line 3"), "{err}");
    }

    /// Property tests of the decoders a job file goes through: any text, and a valid job
    /// file with bytes cut, inserted or replaced, is read to a value or an error, never a
    /// panic; so are `.npy` direction files.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        const VALID: &str = concat!(
            include_str!("../../docs/examples/demo-job.toml"),
            "\n[dataset]\nuri = \"s3://bucket/imagenet/val/\"\nexamples = 16\nimages_per_shard = 500\n",
            "\n[[directions]]\nname = \"inline\"\nlayer = \"conv1\"\nvector = [0.5, -1.0, 2.0]\n",
        );

        /// Reads `text` as the job file `job.toml` in a fresh directory, directions too.
        fn read(text: &[u8]) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("job.toml");
            std::fs::write(&path, text).unwrap();
            if let Ok(file) = JobFile::read(&path) {
                let _ = file.directions();
            }
        }

        /// (position, cut length, bytes inserted there)
        fn edits() -> impl Strategy<Value = Vec<(usize, usize, Vec<u8>)>> {
            proptest::collection::vec((any::<usize>(), 0usize..16, proptest::collection::vec(any::<u8>(), 0..8)), 1..6)
        }

        fn mutate(mut bytes: Vec<u8>, edits: Vec<(usize, usize, Vec<u8>)>) -> Vec<u8> {
            for (at, cut, insert) in edits {
                let at = at % (bytes.len() + 1);
                let end = (at + cut).min(bytes.len());
                bytes.splice(at..end, insert);
            }
            bytes
        }

        #[test]
        fn the_valid_job_file_reads() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("job.toml");
            std::fs::write(&path, VALID).unwrap();
            let file = JobFile::read(&path).unwrap();
            assert!(file.dataset.is_some() && file.directions.len() == 2, "the mutations start from a file that parses whole");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_text(text in ".{0,400}") {
                read(text.as_bytes());
            }

            #[test]
            fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                read(&bytes);
            }

            #[test]
            fn a_valid_job_file_mutated(edits in edits()) {
                read(&mutate(VALID.as_bytes().to_vec(), edits));
            }

            #[test]
            fn a_valid_job_file_with_a_value_replaced(line in any::<usize>(), value in "[ -~]{0,24}") {
                let lines: Vec<&str> = VALID.lines().collect();
                let mut lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                let i = line % lines.len();
                if let Some((key, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{key}= {value}");
                }
                read(lines.join("\n").as_bytes());
            }

            #[test]
            fn npy_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = read_npy(&bytes);
            }

            #[test]
            fn a_valid_npy_mutated(edits in edits()) {
                let data: Vec<u8> = [1.0f32, -2.5, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
                let _ = read_npy(&mutate(npy("<f4", "(3,)", &data), edits));
            }
        }
    }
}
