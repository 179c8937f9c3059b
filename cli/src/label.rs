//! `loupe label`: a researcher's label of a unit, written into the atlas (a directory or
//! S3), where the viewer shows it and finds it by search.

use anyhow::Result;
use clap::Args;

use loupe_core::atlas::Atlas;

#[derive(Args)]
pub struct LabelArgs {
    /// The atlas: a directory, or s3://bucket/prefix.
    pub atlas: String,
    /// The layer, named as `loupe inspect` and atlas.json name it.
    pub layer: String,
    /// The unit's number in the layer.
    pub unit: u32,
    /// What the unit shows, at most 1000 characters on one line; "" removes its label.
    #[arg(allow_hyphen_values = true)]
    pub text: String,
}

pub async fn label(args: LabelArgs) -> Result<()> {
    let atlas = Atlas::open(&args.atlas).await?;
    match atlas.set_label(&args.layer, args.unit, &args.text).await? {
        Some(label) => println!("labelled {} unit {}: {:?}", label.layer, label.unit, label.text),
        None => println!("removed the label of {} unit {}", args.layer, args.unit),
    }
    Ok(())
}
