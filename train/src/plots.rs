//! PNG figures for reports: ROC curves with operating points, confusion-matrix heat maps,
//! training curves. Drawn with plotters into memory, written atomically.

use crate::trainer::EpochLog;
use anyhow::{Result, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use retina_model::host::write_atomic;
use std::path::Path;

const W: u32 = 720;
const H: u32 = 540;

/// DejaVu Sans (Bitstream Vera licence, assets/fonts/LICENSE-DejaVu.txt), shared with the heat
/// map panels.
fn fonts() {
    retina_model::explain::register_font();
}

fn save(path: &Path, buf: Vec<u8>, w: u32, h: u32) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("plot buffer size"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    write_atomic(path, &bytes)?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

/// One ROC curve: name, points (FPR, TPR), and the operating point (FPR, TPR).
pub struct RocCurve {
    /// Legend label.
    pub name: String,
    /// Curve points.
    pub points: Vec<(f64, f64)>,
    /// The operating point.
    pub operating: (f64, f64),
}

/// A chart over the unit square (probabilities or rates on both axes) with its diagonal, the
/// curves `draw` adds and their legend at `legend`, written to `path` as a PNG.
fn unit_square(
    path: &Path,
    title: &str,
    axes: (&str, &str),
    legend: SeriesLabelPosition,
    draw: impl FnOnce(
        &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    ) -> Result<()>,
) -> Result<()> {
    fonts();
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(axes.0)
            .y_desc(axes.1)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))
            .map_err(err)?;
        draw(&mut chart)?;
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    save(path, buf, W, H)
}

/// ROC curves with their operating points marked.
pub fn roc(path: &Path, title: &str, curves: &[RocCurve]) -> Result<()> {
    let axes = (
        "1 - specificity (false positive rate)",
        "sensitivity (true positive rate)",
    );
    unit_square(
        path,
        title,
        axes,
        SeriesLabelPosition::LowerRight,
        |chart| {
            for (i, c) in curves.iter().enumerate() {
                let colour = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(c.points.clone(), colour.stroke_width(2)))
                    .map_err(err)?
                    .label(c.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
                chart
                    .draw_series([Circle::new(c.operating, 6, colour.filled())])
                    .map_err(err)?;
            }
            Ok(())
        },
    )
}

/// One decision's reliability curve before and after temperature scaling.
pub struct ReliabilityCurve {
    /// Legend label (the decision).
    pub name: String,
    /// Bins at the network's own temperature (1).
    pub before: Vec<crate::calibration::Bin>,
    /// Bins at the fitted temperature (what the model answers).
    pub after: Vec<crate::calibration::Bin>,
}

/// A reliability diagram: observed frequency against predicted probability per bin, thin
/// and pale before temperature scaling, thick after; the diagonal is perfect calibration.
pub fn reliability(path: &Path, title: &str, curves: &[ReliabilityCurve]) -> Result<()> {
    let axes = ("predicted probability (bin mean)", "observed frequency");
    let pts = |b: &[crate::calibration::Bin]| -> Vec<(f64, f64)> {
        b.iter().map(|b| (b.confidence, b.frequency)).collect()
    };
    unit_square(path, title, axes, SeriesLabelPosition::UpperLeft, |chart| {
        for (i, c) in curves.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            for (bins, style, dot, when) in [
                (&c.before, colour.mix(0.35).stroke_width(1), 3, "before"),
                (&c.after, colour.stroke_width(3), 5, "after"),
            ] {
                chart
                    .draw_series(LineSeries::new(pts(bins), style))
                    .map_err(err)?
                    .label(format!("{} {when}", c.name))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
                chart
                    .draw_series(
                        pts(bins)
                            .into_iter()
                            .map(|p| Circle::new(p, dot, style.filled())),
                    )
                    .map_err(err)?;
            }
        }
        Ok(())
    })
}

/// A confusion matrix as a heat map (rows: truth, columns: prediction), counts written in.
pub fn confusion(path: &Path, title: &str, m: &[Vec<usize>], names: &[String]) -> Result<()> {
    fonts();
    let k = m.len();
    let (w, h) = (620u32, 560u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(110)
            .build_cartesian_2d(0..k, 0..k)
            .map_err(err)?;
        let label = |i: &usize| names.get(*i).cloned().unwrap_or_default();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(k)
            .y_labels(k)
            .x_label_formatter(&label)
            .y_label_formatter(&|i| k.checked_sub(1 + *i).map(|j| label(&j)).unwrap_or_default())
            .x_desc("prediction")
            .y_desc("truth")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (t, row) in m.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (p, &n) in row.iter().enumerate() {
                let share = n as f64 / total;
                let y = k - 1 - t;
                let colour = RGBColor(
                    (255.0 * (1.0 - 0.8 * share)) as u8,
                    (255.0 * (1.0 - 0.55 * share)) as u8,
                    255,
                );
                chart
                    .draw_series([Rectangle::new([(p, y), (p + 1, y + 1)], colour.filled())])
                    .map_err(err)?;
                chart
                    .draw_series([Text::new(
                        format!("{n}"),
                        (p, y + 1),
                        ("sans-serif", 18).into_font().color(&BLACK),
                    )])
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    save(path, buf, w, h)
}

/// Training curves: total, per-head and L2 losses, and the validation metrics, by epoch.
pub fn training(path: &Path, logs: &[EpochLog]) -> Result<()> {
    fonts();
    if logs.is_empty() {
        return Ok(());
    }
    let (w, h) = (1100u32, 460u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(w / 2);
        let epochs = logs.len() as f64;
        let last = logs.last().expect("non-empty");
        // Left: losses.
        let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![(
            "total".into(),
            logs.iter()
                .map(|l| (l.epoch as f64, l.train_loss))
                .collect(),
        )];
        for name in last.train_head_loss.keys() {
            series.push((
                name.clone(),
                logs.iter()
                    .map(|l| (l.epoch as f64, *l.train_head_loss.get(name).unwrap_or(&0.0)))
                    .collect(),
            ));
        }
        series.push((
            "L2 term".into(),
            logs.iter().map(|l| (l.epoch as f64, l.train_l2)).collect(),
        ));
        if logs.iter().all(|l| l.val.contains_key("val_loss")) {
            series.push((
                "val total".into(),
                logs.iter()
                    .map(|l| (l.epoch as f64, l.val["val_loss"]))
                    .collect(),
            ));
        }
        let ymax = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            * 1.1;
        draw_lines(
            &left,
            "training losses",
            "loss",
            epochs,
            0.0..ymax.max(1e-3),
            &series,
        )?;
        // Right: validation metrics in 0..1.
        let keys: Vec<&String> = last
            .val
            .keys()
            .filter(|k| {
                k.ends_with("auc")
                    || k.ends_with("kappa")
                    || k.ends_with("accuracy")
                    || k.ends_with("_mae")
            })
            .collect();
        let series: Vec<(String, Vec<(f64, f64)>)> = keys
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    logs.iter()
                        .filter_map(|l| l.val.get(*k).map(|v| (l.epoch as f64, *v)))
                        .collect(),
                )
            })
            .collect();
        draw_lines(
            &right,
            "validation metrics",
            "value",
            epochs,
            0.0..1.0,
            &series,
        )?;
        root.present().map_err(err)?;
    }
    save(path, buf, w, h)
}

fn draw_lines(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    ydesc: &str,
    epochs: f64,
    y: std::ops::Range<f64>,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(1f64..epochs.max(2.0), y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(ydesc)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}
