//! The evaluation report for people: `report.html`, self-contained (every image embedded), with
//! the metrics and figures of `report.md` and a gallery of the worst errors at the operating
//! point: for each decision, the false negatives with the lowest probability and the false
//! positives with the highest, each with its thumbnail, its Grad-CAM heat map, truth against
//! prediction and probability, in a table sortable by any column.

use crate::dataset::Sample;
use anyhow::Result;
use base64::Engine as _;
use burn::prelude::Device;
use image::RgbImage;
use retina_model::explain::{grad_cam, overlay};
use retina_model::{Decision, HeadKind, HeadSpec, ModelBundle, OperatingPoint, Prediction};
use std::fmt::Write as _;
use std::path::Path;

/// Errors shown per decision and kind.
pub const PER_KIND: usize = 12;

/// One misjudged image.
#[derive(Debug, Clone, PartialEq)]
pub struct GalleryItem {
    /// Index into the samples.
    pub sample: usize,
    /// The decision it got wrong.
    pub decision: String,
    /// A false negative (missed) or a false positive.
    pub false_negative: bool,
    /// P(yes).
    pub probability: f32,
    /// The operating point's threshold.
    pub threshold: f32,
}

impl GalleryItem {
    /// How far the probability is on the wrong side of the threshold.
    pub fn error(&self) -> f32 {
        (self.probability - self.threshold).abs()
    }
}

/// The worst `per_kind` false negatives and false positives of each decision at `point`,
/// worst first.
pub fn worst_errors(
    decisions: &[Decision],
    samples: &[Sample],
    preds: &[Prediction],
    point: &OperatingPoint,
    per_kind: usize,
) -> Vec<GalleryItem> {
    let mut out = Vec::new();
    for d in decisions {
        let threshold = point.threshold(&d.name);
        let mut wrong: Vec<GalleryItem> = samples
            .iter()
            .zip(preds)
            .enumerate()
            .filter_map(|(i, (s, p))| {
                let truth = d.truth(*s.labels.get(&d.head)?);
                // What the model refused it did not answer, right or wrong; the refusing
                // decision's own errors are shown like any other's.
                let said_yes = p.decide(&d.name, point)?;
                let probability = p.decision_score(&d.name)?;
                (truth != said_yes).then_some(GalleryItem {
                    sample: i,
                    decision: d.name.clone(),
                    false_negative: truth,
                    probability,
                    threshold,
                })
            })
            .collect();
        wrong.sort_by(|a, b| b.error().total_cmp(&a.error()));
        for fneg in [true, false] {
            out.extend(
                wrong
                    .iter()
                    .filter(|w| w.false_negative == fneg)
                    .take(per_kind)
                    .cloned(),
            );
        }
    }
    out
}

fn png_data_uri(img: &RgbImage) -> Result<String> {
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png.into_inner())
    ))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Inline markdown of the report: `code` and **bold**.
fn inline(s: &str) -> String {
    let mut out = String::new();
    let mut code = false;
    for (i, part) in escape(s).split('`').enumerate() {
        if i > 0 {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
        }
        let mut bold = false;
        for (j, p) in part.split("**").enumerate() {
            if j > 0 {
                out.push_str(if bold { "</b>" } else { "<b>" });
                bold = !bold;
            }
            out.push_str(p);
        }
    }
    out
}

/// `report.md` as HTML: the subset it is written in (headings, lists, tables, figures,
/// paragraphs), figures read from `dir` and embedded.
pub fn markdown_to_html(md: &str, dir: &Path) -> Result<String> {
    let mut html = String::new();
    let mut lines = md.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        } else if let Some(h) = t.strip_prefix("### ") {
            let _ = writeln!(html, "<h3>{}</h3>", inline(h));
        } else if let Some(h) = t.strip_prefix("## ") {
            let _ = writeln!(html, "<h2>{}</h2>", inline(h));
        } else if let Some(h) = t.strip_prefix("# ") {
            let _ = writeln!(html, "<h1>{}</h1>", inline(h));
        } else if t.starts_with("- ") {
            html.push_str("<ul>\n");
            let mut item = Some(t);
            while let Some(i) = item {
                let _ = writeln!(html, "<li>{}</li>", inline(&i[2..]));
                item = lines.next_if(|l| l.trim().starts_with("- ")).map(str::trim);
            }
            html.push_str("</ul>\n");
        } else if t.starts_with('|') {
            html.push_str("<table>\n");
            let mut row = Some(t);
            let mut first = true;
            while let Some(r) = row {
                let cells: Vec<&str> = r.trim_matches('|').split('|').map(str::trim).collect();
                let is_rule = cells
                    .iter()
                    .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-'));
                if !is_rule {
                    let tag = if first { "th" } else { "td" };
                    html.push_str("<tr>");
                    for c in cells {
                        let _ = write!(html, "<{tag}>{}</{tag}>", inline(c));
                    }
                    html.push_str("</tr>\n");
                    first = false;
                }
                row = lines.next_if(|l| l.trim().starts_with('|')).map(str::trim);
            }
            html.push_str("</table>\n");
        } else if let Some(rest) = t.strip_prefix("![") {
            let (alt, file) = rest
                .split_once("](")
                .map(|(a, f)| (a, f.trim_end_matches(')')))
                .unwrap_or(("figure", ""));
            let img = image::open(dir.join(file))?.to_rgb8();
            let _ = writeln!(
                html,
                "<figure><img alt=\"{}\" src=\"{}\"></figure>",
                escape(alt),
                png_data_uri(&img)?
            );
        } else {
            let _ = writeln!(html, "<p>{}</p>", inline(t));
        }
    }
    Ok(html)
}

/// What the label and the prediction say, in words (`grade 3 (severe)`, `present`).
fn describe(
    spec: &HeadSpec,
    label: Option<f32>,
    pred: &Prediction,
    said_yes: bool,
) -> (String, String) {
    match spec.kind {
        HeadKind::Multiclass(_) => {
            let names = spec.class_names();
            let name = |k: usize| names.get(k).cloned().unwrap_or_else(|| k.to_string());
            (
                label
                    .map(|l| name(l as usize))
                    .unwrap_or_else(|| "-".into()),
                pred.class(&spec.name)
                    .map(name)
                    .unwrap_or_else(|| "-".into()),
            )
        }
        _ => (
            label
                .map(|l| if l > 0.5 { "present" } else { "absent" }.to_string())
                .unwrap_or_else(|| "-".into()),
            if said_yes { "present" } else { "absent" }.to_string(),
        ),
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;\
text-align:left}th{background:#f2f2f2}#gallery th{cursor:pointer}figure{margin:1em 0}\
figure img{max-width:720px}.fn{color:#b00}.fp{color:#a60}#gallery img{width:128px;height:128px}";

const SORT_SCRIPT: &str = "document.querySelectorAll('#gallery th').forEach((th,col)=>{\
th.addEventListener('click',()=>{const body=th.closest('table').tBodies[0];\
const rows=[...body.rows];const asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';\
rows.sort((a,b)=>{const x=a.cells[col].dataset.v??a.cells[col].textContent;\
const y=b.cells[col].dataset.v??b.cells[col].textContent;const nx=parseFloat(x),ny=parseFloat(y);\
const c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});\
rows.forEach(r=>body.appendChild(r));});});\
window.addEventListener('load',()=>{const imgs=[...document.images];\
document.body.dataset.imagesShown=imgs.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+imgs.length;});";

/// Writes `report.html` into `dir`, beside `report.md` (whose figures it embeds).
#[allow(clippy::too_many_arguments)]
pub fn write_report(
    dir: &Path,
    md: &str,
    bundle: &ModelBundle,
    device: &Device,
    samples: &[Sample],
    preds: &[Prediction],
    point: &OperatingPoint,
    point_name: &str,
) -> Result<usize> {
    let meta = &bundle.metadata;
    let decisions = meta.config.decisions();
    let items = worst_errors(&decisions, samples, preds, point, PER_KIND);
    let pre = &meta.config.preprocess;
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Evaluation report</title><style>{STYLE}</style></head><body>\n"
    );
    html.push_str(&markdown_to_html(md, dir)?);
    let _ = writeln!(
        html,
        "<h2>Worst errors at the operating point <code>{}</code></h2>\n<p>For each decision, \
         up to {PER_KIND} false negatives (lowest probability first) and {PER_KIND} false \
         positives (highest first). The heat map shows where the explained head's predicted \
         class came from. Click a column to sort.</p>",
        escape(point_name)
    );
    if items.is_empty() {
        html.push_str("<p>No errors at this operating point.</p>\n");
    } else {
        html.push_str(
            "<table id=\"gallery\"><thead><tr><th>image</th><th>heat map</th><th>file</th>\
             <th>decision</th><th>error</th><th>truth</th><th>prediction</th>\
             <th>probability</th><th>threshold</th><th>error size</th></tr></thead><tbody>\n",
        );
        for it in &items {
            let s = &samples[it.sample];
            let p = &preds[it.sample];
            let (thumb, heat) = match pre.prepare_path(&s.image) {
                Ok(prepared) => {
                    let h = grad_cam(bundle, &prepared.input, device)?;
                    (
                        png_data_uri(&prepared.view)?,
                        png_data_uri(&overlay(&prepared.view, &h))?,
                    )
                }
                // The image was read for the prediction; if it has gone since, say so.
                Err(_) => (String::new(), String::new()),
            };
            let d = decisions
                .iter()
                .find(|d| d.name == it.decision)
                .expect("an error's decision is the model's");
            let spec = meta.config.head(&d.head).expect("a decision's head");
            let said_yes = it.probability >= it.threshold;
            let (truth, predicted) = describe(spec, s.labels.get(&d.head).copied(), p, said_yes);
            let (kind, class) = if it.false_negative {
                ("false negative", "fn")
            } else {
                ("false positive", "fp")
            };
            let name = s
                .image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = writeln!(
                html,
                "<tr><td><img alt=\"{n}\" src=\"{thumb}\"></td><td><img alt=\"heat map of {n}\" \
                 src=\"{heat}\"></td><td>{n}</td><td>{dec}</td><td class=\"{class}\">{kind}</td>\
                 <td>{truth}</td><td>{predicted}</td><td data-v=\"{p:.6}\">{p:.3}</td>\
                 <td>{t:.3}</td><td data-v=\"{e:.6}\">{e:.3}</td></tr>",
                n = escape(&name),
                dec = escape(&it.decision),
                truth = escape(&truth),
                predicted = escape(&predicted),
                p = it.probability,
                t = it.threshold,
                e = it.error(),
            );
        }
        html.push_str("</tbody></table>\n");
    }
    let _ = write!(html, "<script>{SORT_SCRIPT}</script>\n</body></html>\n");
    retina_model::host::write_atomic(&dir.join("report.html"), html.as_bytes())?;
    Ok(items.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sample(grade: f32) -> Sample {
        Sample {
            image: "x.png".into(),
            labels: BTreeMap::from([("diagnosis".to_string(), grade)]),
            patient: None,
            line: 1,
        }
    }

    fn pred(p_referable: f32) -> Prediction {
        Prediction {
            heads: BTreeMap::new(),
            decisions: BTreeMap::from([("referable".to_string(), p_referable)]),
            ..Prediction::default()
        }
    }

    #[test]
    fn the_worst_errors_of_each_kind_come_first() {
        let decisions = vec![HeadSpec::diagnosis().decision_rule().unwrap()];
        let point = OperatingPoint::default_for(&["referable".into()]);
        // Truth referable (grade >= 2) at indices 0-3; 4-7 not.
        let samples: Vec<Sample> = [3.0, 2.0, 4.0, 2.0, 0.0, 1.0, 0.0, 1.0]
            .into_iter()
            .map(sample)
            .collect();
        let preds: Vec<Prediction> = [0.1, 0.45, 0.9, 0.3, 0.95, 0.2, 0.6, 0.49]
            .into_iter()
            .map(pred)
            .collect();
        let items = worst_errors(&decisions, &samples, &preds, &point, 2);
        let got: Vec<(usize, bool)> = items.iter().map(|i| (i.sample, i.false_negative)).collect();
        // Missed: 0 (p 0.1), 3 (0.3), 1 (0.45): the worst two. False alarms: 4 (0.95), 6 (0.6).
        assert_eq!(got, vec![(0, true), (3, true), (4, false), (6, false)]);
        assert!((items[0].error() - 0.4).abs() < 1e-6);
    }

    #[test]
    fn markdown_tables_lists_and_code_become_html() {
        let dir = tempfile::tempdir().unwrap();
        let html = markdown_to_html(
            "# Report\n\n- model: `m` (x)\n- data: a<b\n\n### part\n\n| a | b |\n|---|---|\n| **1** | 2 |\n",
            dir.path(),
        )
        .unwrap();
        assert!(html.contains("<h1>Report</h1>"), "{html}");
        assert!(
            html.contains("<li>model: <code>m</code> (x)</li>"),
            "{html}"
        );
        assert!(html.contains("<li>data: a&lt;b</li>"), "{html}");
        assert!(html.contains("<h3>part</h3>"), "{html}");
        assert!(html.contains("<tr><th>a</th><th>b</th></tr>"), "{html}");
        assert!(
            html.contains("<tr><td><b>1</b></td><td>2</td></tr>"),
            "{html}"
        );
    }
}
