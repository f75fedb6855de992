//! Input preprocessing shared by training and inference.
//!
//! A fundus photograph becomes the network's input in four steps:
//! 1. decode (JPEG, PNG, TIFF, BMP, WebP; grey, alpha and 16-bit converted to 8-bit RGB), with
//!    size limits so a decompression bomb is refused instead of exhausting memory;
//! 2. find the bright fundus disc and crop the black border around it into a square (padding
//!    with black where the camera clipped the disc), so every image shows the retina at the same
//!    scale whatever the camera's framing;
//! 3. resize to the model's square input size;
//! 4. optionally Graham's local-average-colour subtraction (`4*img - 4*blur(img) + 128`, the rim
//!    masked), which removes illumination differences between cameras; then normalise.
//!
//! Its parameters are part of the model config, so inference cannot drift from training.

use burn::config::Config;
use burn::prelude::*;
use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits, RgbImage};
use std::io::Cursor;
use std::path::Path;

/// How an image becomes the network input.
#[derive(Config, Debug, PartialEq)]
pub struct PreprocessConfig {
    /// Side of the square network input, in pixels.
    #[config(default = 224)]
    pub image_size: usize,
    /// Crop the black border around the fundus disc.
    #[config(default = true)]
    pub crop_to_disc: bool,
    /// Luminance (fraction of full scale) above which a pixel counts as inside the disc.
    #[config(default = 0.07)]
    pub disc_threshold: f32,
    /// Apply Graham's local-average-colour subtraction.
    #[config(default = false)]
    pub graham: bool,
    /// Graham blur sigma as a fraction of the disc radius (Graham used radius / 30).
    #[config(default = "1.0 / 30.0")]
    pub graham_sigma: f32,
    /// Fraction of the disc radius kept by Graham's rim mask; the outer rim becomes neutral grey.
    #[config(default = 0.92)]
    pub rim_fraction: f32,
    /// Per-channel mean subtracted after scaling to 0..1 (R, G, B).
    #[config(default = "[0.5, 0.5, 0.5]")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided after the mean (R, G, B).
    #[config(default = "[0.25, 0.25, 0.25]")]
    pub std: [f32; 3],
    /// Largest accepted width or height of a source image; larger ones are refused as a
    /// possible decompression bomb.
    #[config(default = 16384)]
    pub max_dimension: u32,
}

/// Why an image could not be turned into network input.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The file could not be read.
    #[error("{name}: cannot read the file: {source}")]
    Io {
        /// The image's name or path.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes are not in a format we read.
    #[error(
        "{name}: not an image in a format Retina reads (expected JPEG, PNG, TIFF, BMP or WebP)"
    )]
    NotAnImage {
        /// The image's name or path.
        name: String,
    },
    /// The image is damaged.
    #[error("{name}: the image is corrupt or truncated ({reason})")]
    Corrupt {
        /// The image's name or path.
        name: String,
        /// What the decoder said.
        reason: String,
    },
    /// Too large to decode safely.
    #[error(
        "{name}: the image is {width}x{height} pixels, over the {max}x{max} limit \
         (a decompression bomb, or raise `max_dimension` in the model's preprocessing config)"
    )]
    TooLarge {
        /// The image's name or path.
        name: String,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max: u32,
    },
    /// Zero-sized image.
    #[error("{name}: the image has no pixels")]
    Empty {
        /// The image's name or path.
        name: String,
    },
}

/// An image made ready for the network.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The cropped and resized RGB image (before Graham and normalisation): what the network
    /// "sees", for overlays and for looking at.
    pub view: RgbImage,
    /// The normalised input, channel-major `[3, S, S]`.
    pub input: Vec<f32>,
    /// Width and height of the photograph itself.
    pub source_size: (u32, u32),
    /// Where the view sits in the photograph.
    pub crop: CropBox,
    /// Whether a bright fundus disc was found (always `true` with cropping off): the
    /// gradability check refuses a frame without one.
    pub disc_found: bool,
}

/// Where the network's view sits in the photograph: the disc crop square, in the photograph's
/// own pixels. It may reach past the photograph's edges, where the view is black padding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// Left edge.
    pub x0: f32,
    /// Top edge.
    pub y0: f32,
    /// Width.
    pub width: f32,
    /// Height (equal to the width but for rounding of a scaled decode).
    pub height: f32,
}

impl CropBox {
    /// The square `square_around` cuts for `rect`, in an image `scale` times smaller than the
    /// photograph (per axis).
    fn of(rect: Rect, scale: (f32, f32)) -> CropBox {
        let (left, top, side) = square_box(rect);
        CropBox {
            x0: left as f32 * scale.0,
            y0: top as f32 * scale.1,
            width: side as f32 * scale.0,
            height: side as f32 * scale.1,
        }
    }
}

/// A photograph turned into the network's view (steps 1-3).
#[derive(Debug, Clone)]
pub struct View {
    /// The square view, `image_size` pixels a side.
    pub image: RgbImage,
    /// Width and height of the photograph.
    pub source_size: (u32, u32),
    /// Width and height it was decoded at: smaller than `source_size` where a JPEG was decoded
    /// at a reduced DCT scale.
    pub decoded_size: (u32, u32),
    /// Where the view sits in the photograph.
    pub crop: CropBox,
    /// Whether a bright fundus disc was found (see [`Prepared::disc_found`]).
    pub disc_found: bool,
}

/// A JPEG decoded at `eighths`/8 of its size by libjpeg-turbo (through mozjpeg), as RGB.
/// `None` for colour spaces it does not convert to RGB (CMYK, YCCK): the full decoder does.
fn decode_jpeg_scaled(
    bytes: &[u8],
    name: &str,
    eighths: u8,
) -> Result<Option<RgbImage>, PreprocessError> {
    use mozjpeg::ColorSpace;
    let run = || -> std::io::Result<Option<RgbImage>> {
        let mut d = mozjpeg::Decompress::builder().from_mem(bytes)?;
        if matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK) {
            return Ok(None);
        }
        d.scale(eighths);
        let mut started = d.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        Ok(RgbImage::from_raw(w, h, pixels))
    };
    // libjpeg reports a fatal error by unwinding out of the decoder (the mozjpeg crate's
    // error manager): catch it as the image's error.
    let corrupt = |reason: String| PreprocessError::Corrupt {
        name: name.into(),
        reason,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(e)) => Err(corrupt(e.to_string())),
        Err(panic) => Err(corrupt(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the JPEG decoder failed".into()),
        )),
    }
}

/// What an image's bytes declare, read before decoding.
struct Header {
    format: image::ImageFormat,
    width: u32,
    height: u32,
}

fn corrupt(name: &str, e: image::ImageError) -> PreprocessError {
    PreprocessError::Corrupt {
        name: name.into(),
        reason: e.to_string(),
    }
}

/// A pixel rectangle `[x0, x1) x [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left edge (inclusive).
    pub x0: u32,
    /// Top edge (inclusive).
    pub y0: u32,
    /// Right edge (exclusive).
    pub x1: u32,
    /// Bottom edge (exclusive).
    pub y1: u32,
}

impl Rect {
    /// Width of the rectangle.
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }
    /// Height of the rectangle.
    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }
}

impl PreprocessConfig {
    /// Checks the parameters; returns what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.image_size < 16 || self.image_size > 4096 {
            return Err(format!(
                "image_size must be 16-4096 (got {})",
                self.image_size
            ));
        }
        if !(0.0..1.0).contains(&self.disc_threshold) {
            return Err("disc_threshold must be in [0, 1)".into());
        }
        // Written so that NaN fails every check.
        let in_range =
            self.graham_sigma > 0.0 && self.rim_fraction > 0.0 && self.rim_fraction <= 1.0;
        if !in_range {
            return Err("graham_sigma must be > 0 and rim_fraction in (0, 1]".into());
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err("std must be > 0 for every channel".into());
        }
        if self.max_dimension == 0 {
            return Err("max_dimension must be > 0".into());
        }
        Ok(())
    }

    /// Checks what the bytes are before anything is decoded: a format we read, a JPEG that is
    /// not cut short, a declared size within the limits.
    fn inspect(&self, bytes: &[u8], name: &str) -> Result<Header, PreprocessError> {
        let reader = || {
            ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .expect("reading from memory cannot fail")
        };
        let Some(format) = reader().format() else {
            return Err(PreprocessError::NotAnImage { name: name.into() });
        };
        // The JPEG decoder fills a truncated scan with grey instead of failing, which would turn a
        // half-copied file into a confident prediction. A complete JPEG ends with the EOI marker
        // (FF D9), which cannot occur inside entropy-coded data; allow trailing padding.
        if format == image::ImageFormat::Jpeg {
            let tail = &bytes[bytes.len().saturating_sub(4096)..];
            if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
                return Err(PreprocessError::Corrupt {
                    name: name.into(),
                    reason:
                        "the JPEG data stops before its end-of-image marker: the file is truncated"
                            .into(),
                });
            }
        }
        // Read the declared size first, so a bomb is refused before anything is allocated.
        let (width, height) = reader().into_dimensions().map_err(|e| corrupt(name, e))?;
        if width > self.max_dimension || height > self.max_dimension {
            return Err(PreprocessError::TooLarge {
                name: name.into(),
                width,
                height,
                max: self.max_dimension,
            });
        }
        if width == 0 || height == 0 {
            return Err(PreprocessError::Empty { name: name.into() });
        }
        Ok(Header {
            format,
            width,
            height,
        })
    }

    /// Decodes image bytes at full size; `name` is used in error messages.
    pub fn decode(&self, bytes: &[u8], name: &str) -> Result<DynamicImage, PreprocessError> {
        self.inspect(bytes, name)?;
        self.decode_full(bytes, name)
    }

    fn decode_full(&self, bytes: &[u8], name: &str) -> Result<DynamicImage, PreprocessError> {
        let mut limits = Limits::default();
        limits.max_image_width = Some(self.max_dimension);
        limits.max_image_height = Some(self.max_dimension);
        limits.max_alloc = Some(2 << 30);
        let mut r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .expect("reading from memory cannot fail");
        r.limits(limits);
        r.decode().map_err(|e| match e {
            image::ImageError::Unsupported(_) => PreprocessError::NotAnImage { name: name.into() },
            e => corrupt(name, e),
        })
    }

    /// Decodes so that the shorter side is at least `short_side` pixels, as cheaply as the
    /// format allows: a JPEG at the smallest DCT scale n/8 that still covers it (libjpeg-turbo's
    /// scaled decoding, which skips most of the inverse DCT and leaves up to a 64x smaller image
    /// to crop and resize); anything else in full. Returns the image and whether it is the
    /// full-size one.
    fn decode_covering(
        &self,
        bytes: &[u8],
        name: &str,
        header: &Header,
        short_side: u32,
    ) -> Result<(DynamicImage, bool), PreprocessError> {
        let shorter = header.width.min(header.height) as u64;
        let eighths = (1..8u8).find(|&n| (shorter * n as u64).div_ceil(8) >= short_side as u64);
        if header.format == image::ImageFormat::Jpeg
            && let Some(n) = eighths
            && let Some(img) = decode_jpeg_scaled(bytes, name, n)?
        {
            return Ok((DynamicImage::ImageRgb8(img), false));
        }
        Ok((self.decode_full(bytes, name)?, true))
    }

    /// Decodes, disc-crops and resizes image bytes to the network's view (steps 1-3), decoding
    /// JPEGs only as finely as the view needs. Returns the view and the photograph's own size.
    ///
    /// The first decode assumes the disc spans the photograph's shorter side, as it does in
    /// fundus photographs; when the disc found is smaller than the view, the photograph is
    /// decoded again at the next finer scale, so the view is never upsampled where the full
    /// decode would not have been.
    pub fn view_from_bytes(&self, bytes: &[u8], name: &str) -> Result<View, PreprocessError> {
        let header = self.inspect(bytes, name)?;
        let side = self.image_size as u32;
        let mut short_side = side;
        loop {
            let (img, full) = self.decode_covering(bytes, name, &header, short_side)?;
            // Scaled decodes are RGB already: no copy of the (possibly full-size) image.
            let rgb = img.into_rgb8();
            let (disc, disc_found) = self.disc_rect(&rgb);
            if full || disc.width().max(disc.height()) >= side {
                let scale = (
                    header.width as f32 / rgb.width() as f32,
                    header.height as f32 / rgb.height() as f32,
                );
                return Ok(View {
                    image: self.square_and_resize(&rgb, disc),
                    source_size: (header.width, header.height),
                    decoded_size: rgb.dimensions(),
                    crop: CropBox::of(disc, scale),
                    disc_found,
                });
            }
            // Decode as finely as this disc needs: its share of the shorter side stays the same.
            let decoded_short = rgb.width().min(rgb.height());
            let disc_side = disc.width().max(disc.height()).max(1);
            let needed = (side as u64 * decoded_short as u64).div_ceil(disc_side as u64);
            short_side = (needed as u32).max(decoded_short + 1);
        }
    }

    /// Reads a file and prepares it for the network.
    pub fn prepare_path(&self, path: &Path) -> Result<Prepared, PreprocessError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| PreprocessError::Io {
            name: name.clone(),
            source,
        })?;
        self.prepare_bytes(&bytes, &name)
    }

    /// Decodes bytes and prepares them for the network.
    pub fn prepare_bytes(&self, bytes: &[u8], name: &str) -> Result<Prepared, PreprocessError> {
        let v = self.view_from_bytes(bytes, name)?;
        let input = self.normalise(&v.image);
        Ok(Prepared {
            view: v.image,
            input,
            source_size: v.source_size,
            crop: v.crop,
            disc_found: v.disc_found,
        })
    }

    /// Crops, resizes and normalises a decoded image.
    pub fn prepare(&self, img: &DynamicImage) -> Prepared {
        let rgb = img.to_rgb8();
        let (disc, disc_found) = self.disc_rect(&rgb);
        let view = self.square_and_resize(&rgb, disc);
        let input = self.normalise(&view);
        Prepared {
            view,
            input,
            source_size: rgb.dimensions(),
            crop: CropBox::of(disc, (1.0, 1.0)),
            disc_found,
        }
    }

    /// The photograph for display beside its heat map: its longer side `max_side` at most
    /// (decoded at a reduced DCT scale where that is enough), RGB.
    pub fn display_image(
        &self,
        bytes: &[u8],
        name: &str,
        max_side: u32,
    ) -> Result<RgbImage, PreprocessError> {
        let header = self.inspect(bytes, name)?;
        let (w, h) = (header.width, header.height);
        let long = w.max(h);
        if long <= max_side {
            return Ok(self.decode_full(bytes, name)?.into_rgb8());
        }
        let f = max_side as f64 / long as f64;
        let (dw, dh) = (
            ((w as f64 * f).round() as u32).max(1),
            ((h as f64 * f).round() as u32).max(1),
        );
        let (img, _) = self.decode_covering(bytes, name, &header, dw.min(dh))?;
        Ok(image::imageops::resize(
            &img.into_rgb8(),
            dw,
            dh,
            FilterType::Triangle,
        ))
    }

    /// The rectangle step 2 squares: the disc, or the whole frame when cropping is off or no
    /// disc is found; and whether a disc was found (`true` when cropping is off).
    fn disc_rect(&self, rgb: &RgbImage) -> (Rect, bool) {
        if !self.crop_to_disc {
            return (full_rect(rgb), true);
        }
        match find_disc(rgb, self.disc_threshold) {
            Some(r) => (r, true),
            None => (full_rect(rgb), false),
        }
    }

    fn square_and_resize(&self, rgb: &RgbImage, rect: Rect) -> RgbImage {
        let s = self.image_size as u32;
        let square = square_around(rgb, rect);
        if square.dimensions() == (s, s) {
            square
        } else {
            image::imageops::resize(&square, s, s, FilterType::Triangle)
        }
    }

    /// Steps 2 and 3: square crop around the disc, then resize.
    pub fn crop_and_resize(&self, rgb: &RgbImage) -> RgbImage {
        self.square_and_resize(rgb, self.disc_rect(rgb).0)
    }

    /// Step 4: Graham (optional) and per-channel normalisation to `[3, S, S]`.
    pub fn normalise(&self, view: &RgbImage) -> Vec<f32> {
        let (w, h) = view.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        let graham = self.graham.then(|| {
            let radius = w.min(h) as f32 / 2.0;
            let blurred = image::imageops::fast_blur(view, (radius * self.graham_sigma).max(0.5));
            (blurred, radius)
        });
        let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
        for (x, y, p) in view.enumerate_pixels() {
            let i = (y * w + x) as usize;
            for c in 0..3 {
                let mut v = p[c] as f32;
                if let Some((blurred, radius)) = &graham {
                    let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                    let inside = (dx * dx + dy * dy).sqrt() <= radius * self.rim_fraction;
                    v = if inside {
                        (4.0 * v - 4.0 * blurred.get_pixel(x, y)[c] as f32 + 128.0)
                            .clamp(0.0, 255.0)
                    } else {
                        128.0
                    };
                }
                out[c * plane + i] = (v / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

fn full_rect(img: &RgbImage) -> Rect {
    Rect {
        x0: 0,
        y0: 0,
        x1: img.width(),
        y1: img.height(),
    }
}

/// Finds the bounding box of the bright fundus disc: the rows and columns where at least 1% of
/// pixels are brighter than `threshold` (so JPEG noise and burnt-in text in the border do not
/// count). `None` when nothing plausible is found (a blank frame): then the whole image is used.
pub fn find_disc(img: &RgbImage, threshold: f32) -> Option<Rect> {
    let (w, h) = img.dimensions();
    let t = (threshold * 255.0 * 3.0) as u32;
    let mut rows = vec![0u32; h as usize];
    let mut cols = vec![0u32; w as usize];
    for (x, y, p) in img.enumerate_pixels() {
        if p[0] as u32 + p[1] as u32 + p[2] as u32 > t {
            rows[y as usize] += 1;
            cols[x as usize] += 1;
        }
    }
    let span = |counts: &[u32], other: u32| -> Option<(u32, u32)> {
        let need = (other / 100).max(2);
        let first = counts.iter().position(|&c| c >= need)?;
        let last = counts.iter().rposition(|&c| c >= need)?;
        Some((first as u32, last as u32 + 1))
    };
    let (y0, y1) = span(&rows, w)?;
    let (x0, x1) = span(&cols, h)?;
    // A disc smaller than a tenth of the frame is more likely noise than a fundus.
    if (x1 - x0) * 10 < w.min(h) || (y1 - y0) * 10 < w.min(h) {
        return None;
    }
    Some(Rect { x0, y0, x1, y1 })
}

/// The square of side `max(w, h)` centred on `r`, black where it leaves the image (fundus
/// cameras often clip the top and bottom of the disc).
/// The square `square_around` cuts: left, top (either may be negative) and side.
fn square_box(r: Rect) -> (i64, i64, u32) {
    let side = r.width().max(r.height());
    let left = (r.x0 + r.x1) as i64 / 2 - side as i64 / 2;
    let top = (r.y0 + r.y1) as i64 / 2 - side as i64 / 2;
    (left, top, side)
}

fn square_around(img: &RgbImage, r: Rect) -> RgbImage {
    let (left, top, side) = square_box(r);
    if r.x0 == 0 && r.y0 == 0 && r.width() == side && r.height() == side {
        if img.dimensions() == (side, side) {
            return img.clone();
        }
        return image::imageops::crop_imm(img, 0, 0, side, side).to_image();
    }
    let mut out = RgbImage::new(side, side);
    let (w, h) = img.dimensions();
    // Copy the overlap of the square and the image, row by row.
    let sx0 = left.max(0);
    let sx1 = (left + side as i64).min(w as i64);
    let sy0 = top.max(0);
    let sy1 = (top + side as i64).min(h as i64);
    if sx0 < sx1 && sy0 < sy1 {
        let n = (sx1 - sx0) as usize * 3;
        for sy in sy0..sy1 {
            let src = ((sy as usize * w as usize) + sx0 as usize) * 3;
            let dy = (sy - top) as usize;
            let dst = (dy * side as usize + (sx0 - left) as usize) * 3;
            out.as_mut()[dst..dst + n].copy_from_slice(&img.as_raw()[src..src + n]);
        }
    }
    out
}

/// Stacks prepared inputs into a batch tensor `[N, 3, S, S]` on `device`.
pub fn batch_tensor(inputs: &[&[f32]], image_size: usize, device: &Device) -> Tensor<4> {
    let n = inputs.len();
    let mut data = Vec::with_capacity(n * 3 * image_size * image_size);
    for x in inputs {
        data.extend_from_slice(x);
    }
    Tensor::from_data(
        TensorData::new(data, [n, 3, image_size, image_size]),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgb, Rgba, RgbaImage};

    fn cfg(size: usize) -> PreprocessConfig {
        PreprocessConfig::new().with_image_size(size)
    }

    /// A bright disc of radius `r` centred at (cx, cy) on black.
    fn disc_image(w: u32, h: u32, cx: f32, cy: f32, r: f32) -> RgbImage {
        ImageBuffer::from_fn(w, h, |x, y| {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            if d <= r {
                Rgb([200, 90, 40])
            } else {
                Rgb([3, 2, 1])
            }
        })
    }

    fn encode(img: &DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    #[test]
    fn wide_black_border_is_cropped_to_the_disc() {
        // A 400x300 frame with a disc of radius 60 off centre: the crop must be that disc.
        let img = disc_image(400, 300, 250.0, 140.0, 60.0);
        let r = find_disc(&img, 0.07).unwrap();
        assert!(
            (r.x0 as i32 - 190).abs() <= 1 && (r.x1 as i32 - 311).abs() <= 1,
            "{r:?}"
        );
        assert!(
            (r.y0 as i32 - 80).abs() <= 1 && (r.y1 as i32 - 201).abs() <= 1,
            "{r:?}"
        );
        let view = cfg(64).crop_and_resize(&img);
        assert_eq!(view.dimensions(), (64, 64));
        // The disc now fills the frame: centre and edge midpoints are fundus-coloured,
        // corners are black.
        for (x, y) in [(32, 32), (2, 32), (61, 32), (32, 2), (32, 61)] {
            assert!(
                view.get_pixel(x, y)[0] > 100,
                "({x},{y}) should be inside the disc"
            );
        }
        for (x, y) in [(0, 0), (63, 0), (0, 63), (63, 63)] {
            assert!(view.get_pixel(x, y)[0] < 20, "({x},{y}) should be border");
        }
    }

    #[test]
    fn clipped_disc_is_padded_to_a_square() {
        // Disc of radius 100 in a 300x160 frame: top and bottom are clipped by the camera.
        let img = disc_image(300, 160, 150.0, 80.0, 100.0);
        let r = find_disc(&img, 0.07).unwrap();
        assert_eq!((r.y0, r.y1), (0, 160));
        let view = cfg(100).crop_and_resize(&img);
        // Padded rows at the top and bottom are black; the middle row is the disc.
        assert!(view.get_pixel(50, 1)[0] < 20);
        assert!(view.get_pixel(50, 50)[0] > 100);
    }

    #[test]
    fn blank_frame_keeps_the_whole_image() {
        let img = RgbImage::new(50, 40);
        assert_eq!(find_disc(&img, 0.07), None);
        assert_eq!(cfg(32).crop_and_resize(&img).dimensions(), (32, 32));
    }

    #[test]
    fn grey_rgba_16bit_nonsquare_and_tiny_images_are_accepted() {
        let c = cfg(32);
        let grey = DynamicImage::ImageLuma8(GrayImage::from_fn(70, 50, |x, _| Luma([x as u8 * 3])));
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(9, 5, Rgba([200, 100, 50, 10])));
        let deep = DynamicImage::ImageRgb16(ImageBuffer::from_fn(40, 30, |x, y| {
            Rgb([(x * 1500) as u16, (y * 2000) as u16, 40000])
        }));
        let tiny = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, Rgb([255, 0, 0])));
        for (img, fmt) in [
            (&grey, image::ImageFormat::Png),
            (&rgba, image::ImageFormat::Png),
            (&deep, image::ImageFormat::Png),
            (&deep, image::ImageFormat::Tiff),
            (&tiny, image::ImageFormat::Bmp),
        ] {
            let bytes = encode(img, fmt);
            let p = c.prepare_bytes(&bytes, "t").unwrap();
            assert_eq!(p.view.dimensions(), (32, 32));
            assert_eq!(p.input.len(), 3 * 32 * 32);
            assert!(p.input.iter().all(|v| v.is_finite()));
        }
        // 16-bit values are scaled, not truncated: a 40000/65535 blue becomes ~155/255.
        let p = c.prepare(&deep);
        let b = p.view.get_pixel(16, 16)[2];
        assert!((150..=160).contains(&b), "blue {b}");
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let c = cfg(16).with_crop_to_disc(false);
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(16, 16, Rgb([255, 128, 0])));
        let p = c.prepare(&img);
        assert!((p.input[0] - 2.0).abs() < 1e-6); // (1 - 0.5) / 0.25
        assert!((p.input[256] - (128.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
        assert!((p.input[512] + 2.0).abs() < 1e-6);
    }

    #[test]
    fn graham_flattens_illumination_and_masks_the_rim() {
        // A smooth left-to-right illumination gradient disappears under Graham: the centre row
        // becomes close to neutral grey, while a small dark spot (a lesion) survives.
        let c = cfg(64).with_crop_to_disc(false).with_graham(true);
        let mut img = RgbImage::from_fn(64, 64, |x, _| Rgb([60 + x as u8 * 2, 60, 60]));
        for y in 30..34 {
            for x in 30..34 {
                img.put_pixel(x, y, Rgb([10, 10, 10]));
            }
        }
        let p = c.normalise(&img);
        let neutral = (128.0 / 255.0 - 0.5) / 0.25;
        let at = |x: usize, y: usize| p[y * 64 + x];
        assert!((at(20, 20) - neutral).abs() < 0.3, "{}", at(20, 20));
        assert!((at(44, 44) - neutral).abs() < 0.3, "{}", at(44, 44));
        assert!(
            at(31, 31) < neutral - 1.0,
            "lesion should stay dark: {}",
            at(31, 31)
        );
        assert_eq!(at(0, 0), neutral, "rim is masked");
    }

    #[test]
    fn non_images_truncated_files_and_bombs_are_clear_errors() {
        let c = cfg(32);
        let e = c
            .prepare_bytes(b"image,diagnosis\nx.png,2\n", "labels.csv")
            .unwrap_err();
        assert!(matches!(e, PreprocessError::NotAnImage { .. }), "{e}");
        assert!(e.to_string().starts_with("labels.csv: "));

        let img = DynamicImage::ImageRgb8(disc_image(120, 100, 60.0, 50.0, 45.0));
        let jpeg = encode(&img, image::ImageFormat::Jpeg);
        let e = c
            .prepare_bytes(&jpeg[..jpeg.len() / 3], "eye.jpg")
            .expect_err("truncated");
        assert!(matches!(e, PreprocessError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(
            c.prepare_bytes(&jpeg, "eye.jpg").is_ok(),
            "the whole JPEG decodes"
        );
        let png = encode(&img, image::ImageFormat::Png);
        let e = c
            .prepare_bytes(&png[..png.len() / 2], "eye.png")
            .expect_err("truncated");
        assert!(matches!(e, PreprocessError::Corrupt { .. }), "{e}");

        // A BMP header (no checksum to forge) that declares 40000 x 40000 pixels (1.6 gigapixels).
        let small = encode(
            &DynamicImage::ImageRgb8(RgbImage::new(1, 1)),
            image::ImageFormat::Bmp,
        );
        let mut bomb = small.clone();
        bomb[18..22].copy_from_slice(&40_000i32.to_le_bytes());
        bomb[22..26].copy_from_slice(&40_000i32.to_le_bytes());
        let e = c.prepare_bytes(&bomb, "bomb.bmp").unwrap_err();
        assert!(
            matches!(e, PreprocessError::TooLarge { width: 40_000, .. }),
            "{e}"
        );

        let e = c
            .prepare_path(Path::new("/nonexistent/eye.png"))
            .unwrap_err();
        assert!(matches!(e, PreprocessError::Io { .. }));
        assert!(e.to_string().contains("/nonexistent/eye.png"));
    }

    /// A fundus-like photograph: a shaded disc with dark vessel-like arcs and small bright dots
    /// (a few pixels wide, like exudates), on black.
    fn textured_disc(w: u32, h: u32, cx: f32, cy: f32, r: f32) -> RgbImage {
        ImageBuffer::from_fn(w, h, |x, y| {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let d = (dx * dx + dy * dy).sqrt();
            if d > r {
                return Rgb([2, 1, 1]);
            }
            let shade = 1.0 - 0.4 * d / r;
            let vessel = ((dx * 0.02).sin() * 40.0 - dy).abs() % (r / 3.0) < r / 60.0;
            let dot = (x * 7 + y * 13) % 97 == 0;
            let base = [200.0 * shade, 90.0 * shade, 40.0 * shade];
            let k = if vessel { 0.45 } else { 1.0 };
            let px = |c: f32| if dot { 250.0 } else { c * k };
            Rgb([px(base[0]) as u8, px(base[1]) as u8, px(base[2]) as u8])
        })
    }

    fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!(a.dimensions(), b.dimensions());
        let sum: f64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .sum();
        sum / a.as_raw().len() as f64
    }

    /// Scaled decoding: the smallest DCT scale whose disc still covers the view, and a view
    /// within a grey level or two of the one from the full decode.
    #[test]
    fn jpegs_decode_at_the_smallest_scale_that_covers_the_view() {
        let photo = DynamicImage::ImageRgb8(textured_disc(1600, 1200, 800.0, 600.0, 590.0));
        let jpeg = encode(&photo, image::ImageFormat::Jpeg);
        // 600 px: the disc (1180 px across) is 590 px at 4/8, so 5/8.
        for (side, decoded) in [(128, (200, 150)), (224, (400, 300)), (600, (1000, 750))] {
            let c = cfg(side);
            let v = c.view_from_bytes(&jpeg, "p.jpg").unwrap();
            assert_eq!(v.source_size, (1600, 1200));
            assert_eq!(v.decoded_size, decoded, "{side}-px view");
            let full = c.crop_and_resize(&c.decode(&jpeg, "p.jpg").unwrap().to_rgb8());
            let d = mean_abs_diff(&v.image, &full);
            assert!(
                d < 2.0,
                "{side}-px view: {d:.2} grey levels from the full decode"
            );
        }
    }

    /// A disc much smaller than the frame would be upsampled at the scale the frame suggests:
    /// the decoder must go finer until the disc covers the view.
    #[test]
    fn a_small_disc_is_decoded_finely_enough() {
        let photo = DynamicImage::ImageRgb8(textured_disc(1600, 1200, 700.0, 650.0, 150.0));
        let jpeg = encode(&photo, image::ImageFormat::Jpeg);
        let c = cfg(128);
        let v = c.view_from_bytes(&jpeg, "p.jpg").unwrap();
        // The disc is 300 px across: 37 at 1/8, 75 at 1/4, 150 at 1/2.
        assert_eq!(v.decoded_size, (800, 600));
        let full = c.crop_and_resize(&c.decode(&jpeg, "p.jpg").unwrap().to_rgb8());
        let d = mean_abs_diff(&v.image, &full);
        assert!(d < 3.0, "{d:.2} grey levels from the full decode");
        // Other formats have no scaled decoding.
        let png = encode(&photo, image::ImageFormat::Png);
        assert_eq!(
            c.view_from_bytes(&png, "p.png").unwrap().decoded_size,
            (1600, 1200)
        );
    }
}
