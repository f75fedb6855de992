//! Label files of the public retina data sets, and our native CSV.
//!
//! Every reader reports problems as `file:line:column: what was expected`, where the column is
//! the 1-based field number, and never panics. A label a format does not carry is *missing*
//! (absent from the sample's labels), never zero.

use retina_model::{DIAGNOSIS, FLUID, HeadSpec, NUM_GRADES};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A labelled data set format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// `image,diagnosis,vessel_growth,fluid`: an `image` column, an optional `patient` column
    /// and one column per head of the model, named after the head (any subset; blank =
    /// missing). Cells are parsed as the head's spec says ([`HeadSpec::parse_label`]).
    Native,
    /// APTOS 2019 `train.csv`: `id_code,diagnosis`; images `train_images/{id_code}.png`.
    Aptos,
    /// EyePACS (Kaggle 2015) `trainLabels.csv`: `image,level`; images `train/{image}.jpeg`.
    Eyepacs,
    /// IDRiD disease grading: `Image name,Retinopathy grade,Risk of macular edema`;
    /// images `{name}.jpg`.
    Idrid,
    /// Messidor-2 (Krause et al. adjudication):
    /// `image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable`.
    Messidor2,
    /// DDR grading: text lines `image label` (label 5 = ungradable).
    Ddr,
}

impl DatasetFormat {
    /// Every format's name, for help texts.
    pub const NAMES: &'static str = "native, aptos, eyepacs, idrid, messidor2, ddr";

    /// The folder images live in by default, relative to the label file's folder.
    pub fn default_image_dir(self) -> &'static str {
        match self {
            DatasetFormat::Native => "",
            DatasetFormat::Aptos => "train_images",
            DatasetFormat::Eyepacs => "train",
            DatasetFormat::Idrid => "images",
            DatasetFormat::Messidor2 => "images",
            DatasetFormat::Ddr => "images",
        }
    }

    /// The label file name the format uses (what `synth` writes).
    pub fn default_label_file(self) -> &'static str {
        match self {
            DatasetFormat::Native => "labels.csv",
            DatasetFormat::Aptos => "train.csv",
            DatasetFormat::Eyepacs => "trainLabels.csv",
            DatasetFormat::Idrid => "IDRiD_Disease_Grading_Training_Labels.csv",
            DatasetFormat::Messidor2 => "messidor_data.csv",
            DatasetFormat::Ddr => "train.txt",
        }
    }
}

impl FromStr for DatasetFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "native" => Self::Native,
            "aptos" => Self::Aptos,
            "eyepacs" => Self::Eyepacs,
            "idrid" => Self::Idrid,
            "messidor2" | "messidor-2" => Self::Messidor2,
            "ddr" => Self::Ddr,
            other => return Err(format!("unknown format `{other}`: choose {}", Self::NAMES)),
        })
    }
}

impl fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Aptos => "aptos",
            Self::Eyepacs => "eyepacs",
            Self::Idrid => "idrid",
            Self::Messidor2 => "messidor2",
            Self::Ddr => "ddr",
        })
    }
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Path of the image file.
    pub image: PathBuf,
    /// Label per head name (class index for multiclass heads, 0/1 for binary); a head with no
    /// entry has a missing label.
    pub labels: BTreeMap<String, f32>,
    /// Patient identifier, where the format knows it (both eyes share it).
    pub patient: Option<String>,
    /// Line in the label file (1-based), for messages.
    pub line: usize,
}

impl Sample {
    /// The diagnosis grade, if labelled.
    pub fn grade(&self) -> Option<usize> {
        self.labels.get(DIAGNOSIS).map(|g| *g as usize)
    }
}

/// A label file problem, located.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct DataError {
    /// The label file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based field number.
    pub column: usize,
    /// What was expected and what was found.
    pub message: String,
}

/// A parsed label file.
#[derive(Debug, Clone)]
pub struct LabelFile {
    /// The label file.
    pub path: PathBuf,
    /// Its format.
    pub format: DatasetFormat,
    /// Rows kept (ungradable images are skipped, and counted).
    pub samples: Vec<Sample>,
    /// Rows skipped as ungradable.
    pub skipped_ungradable: usize,
}

struct Located<'a> {
    file: &'a Path,
}

impl Located<'_> {
    fn err(&self, line: usize, column: usize, message: impl Into<String>) -> DataError {
        DataError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}

fn parse_grade(s: &str, max: usize) -> Result<usize, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a grade 0-{max}, found `{s}`"))?;
    if v.fract() != 0.0 || v < 0.0 || v > max as f64 {
        return Err(format!("expected a grade 0-{max}, found `{s}`"));
    }
    Ok(v as usize)
}

fn parse_bool(s: &str) -> Result<f32, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Ok(1.0),
        "0" | "false" | "no" => Ok(0.0),
        _ => Err(format!("expected 0 or 1, found `{s}`")),
    }
}

/// Reads a label file for a model with `heads`. `images` overrides the image folder; by
/// default it is the format's usual folder beside the label file. Image files are not opened
/// here (see [`check_images`]).
pub fn read_labels(
    path: &Path,
    format: DatasetFormat,
    images: Option<&Path>,
    heads: &[HeadSpec],
) -> Result<LabelFile, DataError> {
    let loc = Located { file: path };
    let text = std::fs::read(path).map_err(|e| loc.err(0, 0, format!("cannot read: {e}")))?;
    let text = String::from_utf8(text).map_err(|e| {
        // Point at the line of the first invalid byte.
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        loc.err(line, 1, "the file is not UTF-8 text")
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let image_dir = match images {
        Some(d) => d.to_path_buf(),
        None => base.join(format.default_image_dir()),
    };
    let mut out = LabelFile {
        path: path.to_path_buf(),
        format,
        samples: Vec::new(),
        skipped_ungradable: 0,
    };
    if format == DatasetFormat::Ddr {
        read_ddr(&text, &loc, &image_dir, &mut out)?;
    } else {
        read_csv(&text, &loc, &image_dir, heads, &mut out)?;
    }
    if out.samples.is_empty() && out.skipped_ungradable == 0 {
        let what = if format == DatasetFormat::Ddr {
            "the file has no rows: expected one `image label` line per image"
        } else {
            "the file has a header but no rows: expected one line per image under it"
        };
        return Err(loc.err(text.lines().count().max(1), 1, what));
    }
    // Duplicate images would leak between the splits and count twice.
    let mut seen: HashMap<&Path, usize> = HashMap::new();
    for s in &out.samples {
        if let Some(first) = seen.insert(&s.image, s.line) {
            return Err(loc.err(
                s.line,
                1,
                format!(
                    "duplicate image `{}` (first listed on line {first})",
                    s.image.display()
                ),
            ));
        }
    }
    Ok(out)
}

fn read_ddr(
    text: &str,
    loc: &Located,
    image_dir: &Path,
    out: &mut LabelFile,
) -> Result<(), DataError> {
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let mut parts = raw.split_whitespace();
        let (Some(name), Some(label), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(loc.err(line, 1, format!("expected `image label`, found `{raw}`")));
        };
        let g = parse_grade(label, 5).map_err(|m| loc.err(line, 2, m))?;
        if g == 5 {
            out.skipped_ungradable += 1;
            continue;
        }
        out.samples.push(Sample {
            image: image_dir.join(name),
            labels: BTreeMap::from([(DIAGNOSIS.to_string(), g as f32)]),
            patient: None,
            line,
        });
    }
    Ok(())
}

/// How one CSV column maps to a head label.
#[derive(Clone, Copy)]
enum Column {
    Image,
    Grade,
    /// The native format's column of the model's head `heads[i]`.
    Head(usize),
    Binary(&'static str),
    /// IDRiD's 0-2 risk of macular edema: present when > 0.
    EdemaRisk,
    /// Messidor-2: rows with 0 are ungradable and skipped.
    Gradable,
    /// Columns we know but do not use.
    Ignore,
}

fn schema(format: DatasetFormat, header: &str, heads: &[HeadSpec]) -> Option<Column> {
    use Column::*;
    let h = header.trim();
    match format {
        DatasetFormat::Native => match h {
            "image" => Some(Image),
            "patient" => Some(Ignore),
            _ => heads.iter().position(|s| s.name == h).map(Head),
        },
        DatasetFormat::Aptos => match h {
            "id_code" => Some(Image),
            "diagnosis" => Some(Grade),
            _ => None,
        },
        DatasetFormat::Eyepacs => match h {
            "image" => Some(Image),
            "level" => Some(Grade),
            _ => None,
        },
        DatasetFormat::Idrid => match h {
            "Image name" => Some(Image),
            "Retinopathy grade" => Some(Grade),
            "Risk of macular edema" => Some(EdemaRisk),
            "" => Some(Ignore),
            _ => None,
        },
        DatasetFormat::Messidor2 => match h {
            "image_id" => Some(Image),
            "adjudicated_dr_grade" => Some(Grade),
            "adjudicated_dme" => Some(Binary(FLUID)),
            "adjudicated_gradable" => Some(Gradable),
            _ => None,
        },
        DatasetFormat::Ddr => None,
    }
}

fn required(format: DatasetFormat) -> &'static [&'static str] {
    match format {
        DatasetFormat::Native => &["image"],
        DatasetFormat::Aptos => &["id_code", "diagnosis"],
        DatasetFormat::Eyepacs => &["image", "level"],
        DatasetFormat::Idrid => &["Image name", "Retinopathy grade"],
        DatasetFormat::Messidor2 => &["image_id", "adjudicated_dr_grade"],
        DatasetFormat::Ddr => &[],
    }
}

fn image_path(format: DatasetFormat, dir: &Path, name: &str) -> PathBuf {
    let with_ext = |ext: &str| {
        if Path::new(name).extension().is_some() {
            dir.join(name)
        } else {
            dir.join(format!("{name}.{ext}"))
        }
    };
    match format {
        DatasetFormat::Native | DatasetFormat::Messidor2 | DatasetFormat::Ddr => dir.join(name),
        DatasetFormat::Aptos => with_ext("png"),
        DatasetFormat::Eyepacs => with_ext("jpeg"),
        DatasetFormat::Idrid => with_ext("jpg"),
    }
}

fn patient_of(format: DatasetFormat, name: &str) -> Option<String> {
    match format {
        DatasetFormat::Eyepacs => name
            .rsplit_once('_')
            .filter(|(_, side)| *side == "left" || *side == "right")
            .map(|(p, _)| p.to_string()),
        _ => None,
    }
}

fn read_csv(
    text: &str,
    loc: &Located,
    image_dir: &Path,
    heads: &[HeadSpec],
    out: &mut LabelFile,
) -> Result<(), DataError> {
    let format = out.format;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    let header = match records.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => return Err(loc.err(1, 1, e.to_string())),
        None => {
            return Err(loc.err(
                1,
                1,
                format!(
                    "the file is empty: expected a header with {:?}",
                    required(format)
                ),
            ));
        }
    };
    let mut columns = Vec::new();
    let mut patient_col = None;
    for (i, h) in header.iter().enumerate() {
        match schema(format, h, heads) {
            Some(c) => columns.push(c),
            None => {
                let known: Vec<&str> = match format {
                    DatasetFormat::Native => ["image", "patient"]
                        .into_iter()
                        .chain(heads.iter().map(|s| s.name.as_str()))
                        .collect(),
                    _ => required(format).to_vec(),
                };
                return Err(loc.err(
                    1,
                    i + 1,
                    format!(
                        "unknown column `{}` for the {format} format: expected {known:?}",
                        h.trim()
                    ),
                ));
            }
        }
        if format == DatasetFormat::Native && h.trim() == "patient" {
            patient_col = Some(i);
        }
    }
    for need in required(format) {
        if !header.iter().any(|h| h.trim() == *need) {
            return Err(loc.err(
                1,
                1,
                format!("missing column `{need}` for the {format} format"),
            ));
        }
    }
    for rec in records {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            loc.err(line, 1, e.to_string())
        })?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        if rec.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if rec.len() > columns.len() && rec.iter().skip(columns.len()).any(|f| !f.trim().is_empty())
        {
            return Err(loc.err(
                line,
                columns.len() + 1,
                format!("expected {} fields, found {}", columns.len(), rec.len()),
            ));
        }
        // A missing label is an empty field, not a missing one: a short row is a mistake
        // (columns shifted, a comma lost), never silently "unlabelled". Trailing columns that
        // are ignored anyway (IDRiD's empty ones) may be absent.
        let needed = columns
            .iter()
            .rposition(|c| !matches!(c, Column::Ignore))
            .map_or(0, |i| i + 1);
        if rec.len() < needed {
            return Err(loc.err(
                line,
                rec.len().max(1),
                format!("expected {} fields, found {}", columns.len(), rec.len()),
            ));
        }
        let mut labels = BTreeMap::new();
        let mut image = None;
        let mut gradable = true;
        for (i, col) in columns.iter().enumerate() {
            let cell = rec.get(i).unwrap_or("").trim();
            let at = |m: String| {
                loc.err(
                    line,
                    i + 1,
                    format!("column `{}`: {m}", header.get(i).unwrap_or("").trim()),
                )
            };
            match col {
                Column::Image => {
                    if cell.is_empty() {
                        return Err(at("expected an image name, found an empty cell".into()));
                    }
                    image = Some(cell.to_string());
                }
                Column::Ignore => {}
                _ if cell.is_empty() => {} // missing label
                Column::Grade => {
                    let g = parse_grade(cell, NUM_GRADES - 1).map_err(at)?;
                    labels.insert(DIAGNOSIS.to_string(), g as f32);
                }
                Column::Head(i) => {
                    labels.insert(
                        heads[*i].name.clone(),
                        heads[*i].parse_label(cell).map_err(at)?,
                    );
                }
                Column::Binary(head) => {
                    labels.insert(head.to_string(), parse_bool(cell).map_err(at)?);
                }
                Column::EdemaRisk => {
                    let r = parse_grade(cell, 2).map_err(at)?;
                    labels.insert(FLUID.to_string(), if r > 0 { 1.0 } else { 0.0 });
                }
                Column::Gradable => gradable = parse_bool(cell).map_err(at)? > 0.5,
            }
        }
        if !gradable {
            out.skipped_ungradable += 1;
            continue;
        }
        let name = image.expect("the image column is required");
        let patient = patient_col
            .and_then(|c| rec.get(c))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .or_else(|| patient_of(format, &name));
        out.samples.push(Sample {
            image: image_path(format, image_dir, &name),
            labels,
            patient,
            line,
        });
    }
    Ok(())
}

/// Checks that every image file exists; returns the first missing one as an error located at
/// its label line.
pub fn check_images(file: &LabelFile) -> Result<(), DataError> {
    for s in &file.samples {
        if !s.image.is_file() {
            return Err(DataError {
                file: file.path.clone(),
                line: s.line,
                column: 1,
                message: format!("image file `{}` does not exist", s.image.display()),
            });
        }
    }
    Ok(())
}
