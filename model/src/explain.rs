//! Grad-CAM (Selvaraju et al. 2017): where in the fundus the predicted grade came from.
//!
//! The class score's gradient with respect to the feature map of the stage the diagnosis head
//! reads is averaged per channel into channel weights; the weighted sum of the feature maps,
//! rectified and upsampled, is the heat map. We chose Grad-CAM over integrated gradients: one
//! backward pass instead of dozens, and with a pooled linear head it is exactly the class
//! activation map, which localises lesion-sized evidence well at this network's resolution.
//!
//! The map is computed over the network's view and drawn back onto the photograph through the
//! disc crop ([`PhotoHeat`], [`explanation_panel`]), so a grader sees it at the photograph's
//! own resolution (capped for display), beside the unannotated photograph.

use crate::bundle::ModelBundle;
use crate::head::{DIAGNOSIS, HeadKind, HeadSpec};
use crate::preprocess::CropBox;
use burn::module::Module;
use burn::prelude::*;
use image::{Rgb, RgbImage};

/// Why a heat map could not be computed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExplainError {
    /// The model has no multiclass head.
    #[error("the model has no multiclass head to explain")]
    NoMulticlassHead,
    /// The backward pass did not reach the feature map.
    #[error("no gradient reached the feature map")]
    NoGradient,
}

/// A heat map over the network input, values in [0, 1], row-major `size x size`.
#[derive(Debug, Clone)]
pub struct HeatMap {
    /// Side in pixels (the network input size).
    pub size: usize,
    /// Heat per pixel.
    pub values: Vec<f32>,
}

/// The head Grad-CAM explains: `diagnosis` where the model has it, else its first multiclass
/// head.
pub fn explained_head(heads: &[HeadSpec]) -> Option<usize> {
    heads.iter().position(|h| h.name == DIAGNOSIS).or_else(|| {
        heads
            .iter()
            .position(|h| matches!(h.kind, HeadKind::Multiclass(_)))
    })
}

/// Grad-CAM of the predicted class of the explained head ([`explained_head`]) for one prepared
/// input (`[3, S, S]`).
pub fn grad_cam(
    bundle: &ModelBundle,
    input: &[f32],
    device: &Device,
) -> Result<HeatMap, ExplainError> {
    let s = bundle.metadata.config.preprocess.image_size;
    let grid = grad_cam_grid(bundle, input, device)?;
    Ok(HeatMap {
        size: s,
        values: upsample(&grid.values, grid.width, grid.height, s),
    })
}

/// Grad-CAM at the feature map's own resolution, normalised to a maximum of 1.
#[derive(Debug, Clone)]
pub struct CamGrid {
    /// Feature-map width.
    pub width: usize,
    /// Feature-map height.
    pub height: usize,
    /// The predicted class it explains.
    pub class: usize,
    /// Heat per cell, row-major.
    pub values: Vec<f32>,
}

/// [`grad_cam`] before upsampling.
pub fn grad_cam_grid(
    bundle: &ModelBundle,
    input: &[f32],
    device: &Device,
) -> Result<CamGrid, ExplainError> {
    let s = bundle.metadata.config.preprocess.image_size;
    let head =
        explained_head(&bundle.metadata.config.heads).ok_or(ExplainError::NoMulticlassHead)?;
    let ad = device.clone().autodiff();
    // `valid` first: it switches batch norm to inference statistics, and the fork keeps that state.
    let model = bundle.model.valid().fork(&ad);
    let x = Tensor::<4>::from_data(TensorData::new(input.to_vec(), [1, 3, s, s]), &ad);
    let features = model.feature_map(x, head).detach().require_grad();
    let logits = model.head_from_feature_map(head, features.clone());
    let class = crate::prediction::argmax(
        &logits
            .clone()
            .detach()
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 host data"),
    );
    let score = logits.slice([0..1, class..class + 1]).sum();
    let grads = score.backward();
    let g = features.grad(&grads).ok_or(ExplainError::NoGradient)?;
    let [_, c, h, w] = g.dims();
    let alpha = g.reshape([1, c, h * w]).mean_dim(2); // [1, C, 1]
    let fmap = features.detach().reshape([1, c, h * w]);
    let cam: Vec<f32> = (fmap * alpha)
        .sum_dim(1)
        .reshape([h * w])
        .clamp_min(0.0)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32");
    let max = cam.iter().cloned().fold(0.0f32, f32::max);
    let norm: Vec<f32> = cam
        .iter()
        .map(|v| if max > 0.0 { v / max } else { 0.0 })
        .collect();
    Ok(CamGrid {
        width: w,
        height: h,
        class,
        values: norm,
    })
}

/// Bilinear upsampling of a `w x h` grid to `s x s`.
fn upsample(grid: &[f32], w: usize, h: usize, s: usize) -> Vec<f32> {
    let mut out = vec![0.0; s * s];
    for y in 0..s {
        let fy = ((y as f32 + 0.5) * h as f32 / s as f32 - 0.5).clamp(0.0, (h - 1) as f32);
        let (y0, ay) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(h - 1);
        for x in 0..s {
            let fx = ((x as f32 + 0.5) * w as f32 / s as f32 - 0.5).clamp(0.0, (w - 1) as f32);
            let (x0, ax) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(w - 1);
            let v = |xx: usize, yy: usize| grid[yy * w + xx];
            out[y * s + x] = (v(x0, y0) * (1.0 - ax) + v(x1, y0) * ax) * (1.0 - ay)
                + (v(x0, y1) * (1.0 - ax) + v(x1, y1) * ax) * ay;
        }
    }
    out
}

/// A jet-like colour map: blue (0) through green to red (1).
fn colour(v: f32) -> [f32; 3] {
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [r * 255.0, g * 255.0, b * 255.0]
}

/// The fundus with the heat map blended over it (stronger where hotter).
pub fn overlay(view: &RgbImage, heat: &HeatMap) -> RgbImage {
    let mut out = view.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        let v = heat.values[y as usize * heat.size + x as usize];
        let c = colour(v);
        let a = 0.15 + 0.45 * v;
        *p = Rgb([
            (p[0] as f32 * (1.0 - a) + c[0] * a) as u8,
            (p[1] as f32 * (1.0 - a) + c[1] * a) as u8,
            (p[2] as f32 * (1.0 - a) + c[2] * a) as u8,
        ]);
    }
    out
}

/// A heat map drawn back onto the photograph: `width x height` values in [0, 1], 0 outside the
/// disc crop the network saw.
#[derive(Debug, Clone)]
pub struct PhotoHeat {
    /// Width in pixels (the displayed photograph's).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Heat per pixel, row-major.
    pub values: Vec<f32>,
}

impl PhotoHeat {
    /// Maps `heat` (over the view) through `crop` (where the view sits in a photograph of
    /// `source` pixels) onto a display of `display` pixels of the same photograph.
    pub fn map(heat: &HeatMap, crop: &CropBox, source: (u32, u32), display: (u32, u32)) -> Self {
        let (dw, dh) = display;
        let s = heat.size as f32;
        let (kx, ky) = (
            source.0 as f32 / dw.max(1) as f32,
            source.1 as f32 / dh.max(1) as f32,
        );
        let mut values = vec![0.0f32; (dw * dh) as usize];
        for y in 0..dh {
            // Photo pixel centre -> view coordinates.
            let sy = (y as f32 + 0.5) * ky;
            let vy = (sy - crop.y0) / crop.height * s - 0.5;
            if !(-0.5..s - 0.5).contains(&vy) {
                continue;
            }
            for x in 0..dw {
                let sx = (x as f32 + 0.5) * kx;
                let vx = (sx - crop.x0) / crop.width * s - 0.5;
                if !(-0.5..s - 0.5).contains(&vx) {
                    continue;
                }
                values[(y * dw + x) as usize] = bilinear(heat, vx, vy);
            }
        }
        PhotoHeat {
            width: dw,
            height: dh,
            values,
        }
    }

    /// Where the map is hottest: `(x, y)` in display pixels.
    pub fn peak(&self) -> (u32, u32) {
        let i = self
            .values
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0) as u32;
        (i % self.width.max(1), i / self.width.max(1))
    }
}

fn bilinear(heat: &HeatMap, x: f32, y: f32) -> f32 {
    let n = heat.size;
    let clamp = |v: f32| v.clamp(0.0, (n - 1) as f32);
    let (x, y) = (clamp(x), clamp(y));
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(n - 1), (y0 + 1).min(n - 1));
    let (ax, ay) = (x.fract(), y.fract());
    let v = |xx: usize, yy: usize| heat.values[yy * n + xx];
    (v(x0, y0) * (1.0 - ax) + v(x1, y0) * ax) * (1.0 - ay)
        + (v(x0, y1) * (1.0 - ax) + v(x1, y1) * ax) * ay
}

/// Pixels between the two photographs of a panel.
pub const PANEL_GAP: u32 = 16;
/// Height of the strip under them: the colour scale and the caption.
pub const PANEL_STRIP: u32 = 28 + 22 * 3;

/// A grader's picture: the photograph as it is (left) and with the heat drawn over it (right),
/// then a colour scale and up to three caption lines (grade, referable probability, operating
/// point). `photo` is the displayed photograph, `heat` mapped onto it.
pub fn explanation_panel(photo: &RgbImage, heat: &PhotoHeat, caption: &[String]) -> RgbImage {
    let (w, h) = photo.dimensions();
    assert_eq!(
        (heat.width, heat.height),
        (w, h),
        "heat map and photograph sizes"
    );
    let (cw, ch) = (2 * w + PANEL_GAP, h + PANEL_STRIP);
    let mut canvas = RgbImage::from_pixel(cw, ch, Rgb([255, 255, 255]));
    image::imageops::replace(&mut canvas, photo, 0, 0);
    let mut hot = photo.clone();
    for (x, y, p) in hot.enumerate_pixels_mut() {
        let v = heat.values[(y * w + x) as usize];
        // Cold areas keep the photograph's own colours.
        let a = (0.6 * v).min(0.6) * if v > 0.05 { 1.0 } else { v / 0.05 };
        let c = colour(v);
        for k in 0..3 {
            p[k] = (p[k] as f32 * (1.0 - a) + c[k] * a) as u8;
        }
    }
    image::imageops::replace(&mut canvas, &hot, (w + PANEL_GAP) as i64, 0);
    // The colour scale, 0 to 1, left of the caption.
    let bar_w = 256.min(cw.saturating_sub(20));
    for x in 0..bar_w {
        let c = colour(x as f32 / (bar_w - 1).max(1) as f32);
        for y in 0..12 {
            canvas.put_pixel(10 + x, h + 8 + y, Rgb([c[0] as u8, c[1] as u8, c[2] as u8]));
        }
    }
    draw_text(&mut canvas, &scale_and_caption(caption, bar_w, h));
    canvas
}

fn scale_and_caption(caption: &[String], bar_w: u32, h: u32) -> Vec<(String, i32, i32)> {
    let mut items = vec![
        ("low".to_string(), 10, (h + 22) as i32),
        (
            "high: where the grade came from".to_string(),
            (10 + bar_w) as i32 - 40,
            (h + 22) as i32,
        ),
    ];
    for (i, line) in caption.iter().take(3).enumerate() {
        items.push((line.clone(), 10, (h + 40 + 22 * i as u32) as i32));
    }
    items
}

/// The sans-serif font every figure of the project uses (DejaVu Sans), registered once.
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        // The bytes are a valid TrueType font shipped with the project.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes);
    });
}

fn draw_text(canvas: &mut RgbImage, items: &[(String, i32, i32)]) {
    use plotters::prelude::*;
    register_font();
    let (w, h) = canvas.dimensions();
    let root = BitMapBackend::with_buffer(canvas, (w, h)).into_drawing_area();
    let style = ("sans-serif", 15).into_font().color(&BLACK);
    for (text, x, y) in items {
        // A caption that does not fit is clipped by the backend; nothing to report.
        let _ = root.draw_text(text, &style, (*x, *y));
    }
    let _ = root.present();
}
