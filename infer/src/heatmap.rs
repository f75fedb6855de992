//! Heat maps for `predict --heatmap` and `serve ?heatmap=true`: Grad-CAM lives in
//! [`retina_model::explain`] (evaluation reports draw it too); this module renders a prediction's
//! panel at the photograph's own resolution.

use anyhow::Result;
use retina_model::explain::{PhotoHeat, explanation_panel};
use retina_model::{CropBox, HeadSpec, OperatingPoint, Prediction, PreprocessConfig};

pub use retina_model::explain::{HeatMap, explained_head, grad_cam, overlay};

/// Longest side of a panel's photographs unless asked otherwise: enough to tell a lesion.
pub const DEFAULT_MAX_SIDE: u32 = 1024;

/// The caption under a panel: the explained head's answer, its decision and the point.
pub fn caption(
    heads: &[HeadSpec],
    prediction: &Prediction,
    point: &OperatingPoint,
    point_name: &str,
) -> Vec<String> {
    let mut lines: Vec<String> = explained_head(heads)
        .map(|i| prediction.head_lines(&heads[i], point))
        .unwrap_or_default()
        .into_iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    lines.truncate(2);
    lines.push(format!("operating point: {point_name}"));
    lines
}

/// Where a heat map goes: the photograph's bytes and where the network's view sits in it.
#[derive(Debug, Clone, Copy)]
pub struct Photo<'a> {
    /// The encoded file.
    pub bytes: &'a [u8],
    /// Its name, for errors.
    pub name: &'a str,
    /// The view's square in the photograph.
    pub crop: CropBox,
    /// The photograph's size.
    pub source: (u32, u32),
}

/// The panel for one image as PNG bytes: the photograph decoded for display (longer side
/// `max_side` at most), `heat` mapped back onto it, and the caption.
pub fn panel_png(
    pre: &PreprocessConfig,
    photo: Photo,
    heat: &HeatMap,
    caption: &[String],
    max_side: u32,
) -> Result<Vec<u8>> {
    let shown = pre.display_image(photo.bytes, photo.name, max_side)?;
    let on_photo = PhotoHeat::map(heat, &photo.crop, photo.source, shown.dimensions());
    let panel = explanation_panel(&shown, &on_photo, caption);
    let mut png = std::io::Cursor::new(Vec::new());
    panel.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(png.into_inner())
}
