//! Image grids as PNG files: how a CVAE run shows its samples and reconstructions.
//!
//! [`grid_png`] lays out a batch of `[N,3,H,W]` images in `[0,1]` row by row with a thin border
//! and encodes the result as an 8-bit RGB PNG in memory (the `png` crate). Must not know about
//! models or jobs, and must not panic on tensors of the wrong shape (they are an error).

use tch::{Device, Kind, Tensor};

/// Pixels of border between and around the images.
pub const PAD: usize = 2;
/// Border colour (mid grey, visible against both dark and light images).
const BORDER: [u8; 3] = [128, 128, 128];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image grid: expected images [N,3,H,W], got {0:?}")]
    Shape(Vec<i64>),
    #[error("image grid: {0}")]
    Tensor(#[from] tch::TchError),
    #[error("image grid: encoding png: {0}")]
    Png(#[from] png::EncodingError),
}

/// `images` (`[N,3,H,W]`, values clamped into `[0,1]`, any device) as one PNG with `cols` images
/// per row; the last row is left blank where `N` is not a multiple of `cols`.
pub fn grid_png(images: &Tensor, cols: usize) -> Result<Vec<u8>, ImageError> {
    let size = images.size();
    let &[n, 3, h, w] = size.as_slice() else {
        return Err(ImageError::Shape(size));
    };
    if n < 1 || h < 1 || w < 1 || cols == 0 {
        return Err(ImageError::Shape(size));
    }
    // To bytes on the host, channels last: [N,H,W,3].
    let bytes = images
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_clamp(0.0, 1.0)?
        .f_mul_scalar(255.0)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?
        .f_permute([0, 2, 3, 1])?
        .f_contiguous()?;
    let pixels = Vec::<u8>::try_from(&bytes.f_reshape([-1])?)?;
    let (n, h, w) = (n as usize, h as usize, w as usize);
    let rows = n.div_ceil(cols);
    let width = cols * (w + PAD) + PAD;
    let height = rows * (h + PAD) + PAD;
    let mut canvas: Vec<u8> = BORDER
        .iter()
        .copied()
        .cycle()
        .take(width * height * 3)
        .collect();
    for i in 0..n {
        let (top, left) = (PAD + (i / cols) * (h + PAD), PAD + (i % cols) * (w + PAD));
        for y in 0..h {
            let src = &pixels[(i * h + y) * w * 3..(i * h + y + 1) * w * 3];
            let start = ((top + y) * width + left) * 3;
            canvas[start..start + w * 3].copy_from_slice(src);
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&canvas)?;
        writer.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("png frame");
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    #[test]
    fn a_grid_lays_images_out_in_rows_with_a_border() {
        // Three 2x2 images: black, white and pure red; two per row.
        let opts = (Kind::Float, Device::Cpu);
        let black = Tensor::zeros([1, 3, 2, 2], opts);
        let white = Tensor::ones([1, 3, 2, 2], opts);
        let red = Tensor::cat(
            &[
                Tensor::ones([1, 1, 2, 2], opts),
                Tensor::zeros([1, 2, 2, 2], opts),
            ],
            1,
        );
        let images = Tensor::cat(&[black, white, red], 0);
        let bytes = grid_png(&images, 2).expect("png");
        let (info, px) = decode(&bytes);
        let (w, h) = (2 * (2 + PAD) + PAD, 2 * (2 + PAD) + PAD);
        assert_eq!((info.width as usize, info.height as usize), (w, h));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let at = |x: usize, y: usize| &px[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(at(0, 0), BORDER);
        assert_eq!(at(PAD, PAD), [0, 0, 0]);
        assert_eq!(at(PAD + 2 + PAD, PAD + 1), [255, 255, 255]);
        assert_eq!(at(PAD + 1, PAD + 2 + PAD), [255, 0, 0]);
        assert_eq!(at(PAD + 2 + PAD, PAD + 2 + PAD), BORDER, "blank cell");
    }

    #[test]
    fn a_wrong_shape_is_an_error() {
        let t = Tensor::zeros([2, 1, 4, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(grid_png(&t, 2), Err(ImageError::Shape(_))));
    }
}
