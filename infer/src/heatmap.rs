//! Grad-CAM (Selvaraju et al. 2017): where in the fundus the predicted grade came from.
//!
//! The class score's gradient with respect to the feature map of the stage the diagnosis head
//! reads is averaged per channel into channel weights; the weighted sum of the feature maps,
//! rectified and upsampled, is the heat map. We chose Grad-CAM over integrated gradients: one
//! backward pass instead of dozens, and with a pooled linear head it is exactly the class
//! activation map, which localises lesion-sized evidence well at this network's resolution.

use anyhow::{Result, anyhow};
use burn::module::Module;
use burn::prelude::*;
use image::{Rgb, RgbImage};
use retina_model::{DIAGNOSIS, HeadKind, ModelBundle};

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
pub fn explained_head(bundle: &ModelBundle) -> Option<usize> {
    let heads = &bundle.metadata.config.heads;
    heads.iter().position(|h| h.name == DIAGNOSIS).or_else(|| {
        heads
            .iter()
            .position(|h| matches!(h.kind, HeadKind::Multiclass(_)))
    })
}

/// Grad-CAM of the predicted class of the explained head ([`explained_head`]) for one prepared
/// input (`[3, S, S]`).
pub fn grad_cam(bundle: &ModelBundle, input: &[f32], device: &Device) -> Result<HeatMap> {
    let s = bundle.metadata.config.preprocess.image_size;
    let head = explained_head(bundle)
        .ok_or_else(|| anyhow!("the model has no multiclass head to explain"))?;
    let ad = device.clone().autodiff();
    // `valid` first: it switches batch norm to inference statistics, and the fork keeps that state.
    let model = bundle.model.valid().fork(&ad);
    let x = Tensor::<4>::from_data(TensorData::new(input.to_vec(), [1, 3, s, s]), &ad);
    let features = model.feature_map(x, head).detach().require_grad();
    let logits = model.head_from_feature_map(head, features.clone());
    let class = retina_model::prediction::argmax(
        &logits
            .clone()
            .detach()
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 host data"),
    );
    let score = logits.slice([0..1, class..class + 1]).sum();
    let grads = score.backward();
    let g = features
        .grad(&grads)
        .ok_or_else(|| anyhow!("no gradient reached the feature map"))?;
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
    Ok(HeatMap {
        size: s,
        values: upsample(&norm, w, h, s),
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
