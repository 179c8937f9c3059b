//! PNG encoding. The encoder's settings are fixed, so equal pixels give equal bytes.

pub fn encode_rgb(rgb: &[u8], width: u32, height: u32) -> Vec<u8> {
    encode(rgb, 3, width, height)
}

/// 1 channel: grayscale; 3: RGB.
pub fn encode(pixels: &[u8], channels: u8, width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(if channels == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Default);
        let mut writer = encoder.write_header().expect("writing to a Vec cannot fail");
        writer.write_image_data(pixels).expect("pixels has width * height * channels bytes");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_and_decodes_the_same_pixels() {
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        let bytes = super::encode_rgb(&rgb, 4, 3);
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (4, 3));
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
    }
}
