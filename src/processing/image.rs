//! Decoding images and the pixel operations of preprocessing: conversion to RGB, bicubic resize,
//! cropping and normalisation.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use fast_image_resize::images::{Image as ResizeBuffer, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// Limits applied while decoding untrusted images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most pixels (width x height) an image may have. The default is Pillow's
    /// `MAX_IMAGE_PIXELS` (89,478,485, about 9459 x 9459).
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_pixels: 89_478_485 }
    }
}

/// A decoded image, in whatever colour mode its file had. GIFs keep their first frame.
#[derive(Debug, Clone)]
pub struct Image {
    pixels: DynamicImage,
}

impl Image {
    /// Reads and decodes an image file (JPEG, PNG, WebP, GIF or BMP) with the default limits.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_limits(path, &ImageLimits::default())
    }

    /// Reads and decodes an image file, refusing images over `limits`.
    pub fn open_with_limits(path: impl AsRef<Path>, limits: &ImageLimits) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        decode(&bytes, limits, Some(path.display().to_string()))
    }

    /// Decodes an image held in memory (an upload, a data URI), with the default limits.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_bytes_with_limits(bytes, &ImageLimits::default())
    }

    /// Decodes an image held in memory, refusing images over `limits`.
    pub fn from_bytes_with_limits(bytes: &[u8], limits: &ImageLimits) -> Result<Self> {
        decode(bytes, limits, None)
    }

    /// Width and height of an encoded image, read from its header without decoding any pixel.
    pub fn dimensions_of(bytes: &[u8]) -> Result<(u32, u32)> {
        let error = |e: image::ImageError| Error::Image { source_name: None, reason: e.to_string() };
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::Image { source_name: None, reason: e.to_string() })?;
        reader.into_dimensions().map_err(error)
    }

    /// Wraps raw RGB pixels, row-major, 3 bytes per pixel.
    pub fn from_rgb8(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::EmptyImage { source_name: None, width, height });
        }
        let expected = width as usize * height as usize * 3;
        let len = rgb.len();
        let buffer = RgbImage::from_raw(width, height, rgb).ok_or_else(|| Error::Image {
            source_name: None,
            reason: format!("{len} bytes for a {width}x{height} RGB image, expected {expected}"),
        })?;
        Ok(Self { pixels: DynamicImage::ImageRgb8(buffer) })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.pixels.width()
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.pixels.height()
    }

    /// Whether the image has an alpha channel.
    pub fn has_alpha(&self) -> bool {
        self.pixels.color().has_alpha()
    }

    /// The image as 8-bit RGB, transparency handled as `alpha` says.
    pub fn to_rgb8(&self, alpha: AlphaMode) -> RgbImage {
        self.rgb8(alpha).into_owned()
    }

    /// The image as 8-bit RGB, borrowed when it already is (no copy of a decoded JPEG).
    pub fn rgb8(&self, alpha: AlphaMode) -> Cow<'_, RgbImage> {
        match &self.pixels {
            DynamicImage::ImageRgb8(rgb) => Cow::Borrowed(rgb),
            _ => Cow::Owned(self.converted_to_rgb8(alpha)),
        }
    }

    fn converted_to_rgb8(&self, alpha: AlphaMode) -> RgbImage {
        if !self.has_alpha() {
            return self.pixels.to_rgb8();
        }
        match alpha {
            AlphaMode::Discard => self.pixels.to_rgb8(),
            AlphaMode::CompositeOnWhite => {
                let rgba = self.pixels.to_rgba8();
                RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                    let [r, g, b, a] = rgba.get_pixel(x, y).0;
                    image::Rgb([over_white(r, a), over_white(g, a), over_white(b, a)])
                })
            }
        }
    }
}

fn decode(bytes: &[u8], limits: &ImageLimits, source_name: Option<String>) -> Result<Image> {
    let decode_error = |reason: String| Error::Image { source_name: source_name.clone(), reason };
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| decode_error(e.to_string()));
    // Look at the header before allocating anything for the pixels.
    let (width, height) = reader()?.into_dimensions().map_err(|e| decode_error(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(Error::EmptyImage { source_name, width, height });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(Error::ImageTooLarge { source_name, width, height, limit: limits.max_pixels });
    }
    let mut reader = reader()?;
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        return decode_jpeg_strictly(bytes).map_err(decode_error);
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16).max(1 << 20));
    reader.limits(decoder_limits);
    let pixels = reader.decode().map_err(|e| decode_error(e.to_string()))?;
    Ok(Image { pixels })
}

/// JPEG through zune-jpeg in strict mode: a truncated or corrupt stream is an error, as in PIL,
/// instead of an image with a grey bottom (the `image` crate decodes leniently).
fn decode_jpeg_strictly(bytes: &[u8]) -> std::result::Result<Image, String> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let rgb = decoder.decode().map_err(|e| e.to_string())?;
    let (width, height) = decoder.dimensions().ok_or("JPEG without dimensions")?;
    let buffer = RgbImage::from_raw(width as u32, height as u32, rgb).ok_or("JPEG decoded to the wrong size")?;
    Ok(Image { pixels: DynamicImage::ImageRgb8(buffer) })
}

/// How transparent pixels become RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlphaMode {
    /// Composite onto white, as transformers' image processors do (`convert_to_rgb`).
    CompositeOnWhite,
    /// Drop the alpha channel, as `PIL.Image.convert("RGB")` (OpenGVLab's code) does.
    Discard,
}

/// One channel of `value` with opacity `alpha` over an opaque white background, with Pillow's
/// integer arithmetic (`ImagingAlphaComposite`, 7 bits of extra precision, rounded /255).
fn over_white(value: u8, alpha: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    match alpha {
        0 => 255,
        255 => value,
        _ => {
            let alpha = u32::from(alpha);
            let blend = 255 * (255 - alpha);
            let out_alpha_255 = alpha * 255 + blend;
            let coef1 = alpha * 255 * 255 * (1 << PRECISION_BITS) / out_alpha_255;
            let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
            let tmp = u32::from(value) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
            let div255 = ((tmp >> 8) + tmp) >> 8;
            (div255 >> PRECISION_BITS) as u8
        }
    }
}

/// Bicubic resize with Pillow's filter (a = -0.5, support widened when downscaling, i.e.
/// antialiased), as PIL's `BICUBIC` and torchvision's antialiased bicubic compute it.
///
/// Like Pillow, the horizontal pass runs first and its result is rounded to 8 bits before the
/// vertical pass; the order matters where overshoot is clipped.
pub fn resize(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let horizontal = resize_pass(image, width, image.height());
    resize_pass(&horizontal, width, height)
}

/// One separable pass (only one of the two dimensions changes).
fn resize_pass(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let source = ImageRef::new(image.width(), image.height(), image.as_raw(), PixelType::U8x3)
        .expect("an RgbImage buffer always matches its dimensions");
    let mut target = ResizeBuffer::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new().resize(&source, &mut target, &options).expect("U8x3 to U8x3 resizing is supported");
    RgbImage::from_raw(width, height, target.into_vec()).expect("the resizer fills the whole buffer")
}

/// Bicubic resize with the same filter as [`resize`] on floating-point levels, as torchvision's
/// antialiased bicubic computes it on a float tensor: no rounding between or after the passes and
/// no clipping (overshoot below 0 and above 255 is kept). Returns interleaved RGB levels.
pub fn resize_levels(image: &RgbImage, width: u32, height: u32) -> Vec<f32> {
    let levels: Vec<f32> = image.as_raw().iter().map(|&level| f32::from(level)).collect();
    if image.dimensions() == (width, height) {
        return levels;
    }
    let bytes: Vec<u8> = levels.iter().flat_map(|level| level.to_ne_bytes()).collect();
    let source = ImageRef::new(image.width(), image.height(), &bytes, PixelType::F32x3)
        .expect("an RgbImage's levels always match its dimensions");
    let mut target = ResizeBuffer::new(width, height, PixelType::F32x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new().resize(&source, &mut target, &options).expect("F32x3 to F32x3 resizing is supported");
    target.buffer().chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// The `size x size` square whose top-left corner is at (`x`, `y`).
pub fn crop(image: &RgbImage, x: u32, y: u32, size: u32) -> RgbImage {
    image::imageops::crop_imm(image, x, y, size, size).to_image()
}

/// Rescaling and normalisation parameters (`rescale_factor`, `image_mean`, `image_std`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Multiplies 0-255 levels (1/255).
    pub rescale_factor: f32,
    /// Per-channel mean, after rescaling.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, after rescaling.
    pub std: [f32; 3],
}

/// `image_mean`, `image_std` and `rescale_factor` as image processor files write them (each
/// optional).
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub(crate) struct NormalizationJson {
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f32>,
}

impl NormalizationJson {
    /// The file's values, `defaults` for those it leaves out.
    pub(crate) fn or(self, defaults: Normalization) -> Normalization {
        Normalization {
            rescale_factor: self.rescale_factor.unwrap_or(defaults.rescale_factor),
            mean: self.image_mean.unwrap_or(defaults.mean),
            std: self.image_std.unwrap_or(defaults.std),
        }
    }
}

impl Normalization {
    /// ImageNet statistics, used by every InternVL checkpoint.
    pub const IMAGENET: Self =
        Self { rescale_factor: 1.0 / 255.0, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

    /// OpenAI CLIP's statistics (Qwen2-VL and Qwen2.5-VL), as transformers writes them.
    #[allow(clippy::excessive_precision)]
    pub const OPENAI_CLIP: Self = Self {
        rescale_factor: 1.0 / 255.0,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
    };

    /// Why these values would turn pixels into NaN or infinity, if they would.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(format!("image_std {:?} must be finite and non-zero", self.std));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(format!("image_mean {:?} must be finite", self.mean));
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return Err(format!("rescale_factor {} must be a finite number > 0", self.rescale_factor));
        }
        Ok(())
    }

    /// The image as channel-first floats, `[3, height, width]`.
    pub fn planes(&self, image: &RgbImage) -> Vec<f32> {
        let mut out = Vec::with_capacity(3 * image.width() as usize * image.height() as usize);
        self.extend_chw(image, &mut out);
        out
    }

    /// Appends the tile as channel-first floats: `(level * rescale - mean) / std`.
    pub fn extend_chw(&self, tile: &RgbImage, out: &mut Vec<f32>) {
        for channel in 0..3 {
            let (mean, std) = (self.mean[channel], self.std[channel]);
            out.extend(tile.pixels().map(|p| (f32::from(p.0[channel]) * self.rescale_factor - mean) / std));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_matches_pillow_at_the_extremes_and_rounds_in_between() {
        assert_eq!(over_white(10, 0), 255);
        assert_eq!(over_white(10, 255), 10);
        // 0 at half opacity over white: 255 * 127 / 255 = 127.0 -> 127 (Pillow gives 127 too)
        assert_eq!(over_white(0, 128), 127);
        for value in [0u8, 1, 100, 254, 255] {
            for alpha in 1u8..255 {
                let exact = (f64::from(value) * f64::from(alpha) + 255.0 * f64::from(255 - alpha)) / 255.0;
                assert!((f64::from(over_white(value, alpha)) - exact).abs() <= 1.0, "{value} {alpha}");
            }
        }
    }

    #[test]
    fn zero_sized_raw_image_is_refused() {
        assert!(matches!(Image::from_rgb8(0, 5, vec![]), Err(Error::EmptyImage { width: 0, height: 5, .. })));
        assert!(matches!(Image::from_rgb8(2, 2, vec![0; 5]), Err(Error::Image { .. })));
    }

    #[test]
    fn resizing_to_the_same_size_is_the_identity() {
        let image = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        assert_eq!(resize(&image, 5, 4), image);
    }
}
