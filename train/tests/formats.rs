//! Label files of every supported data set: parsing and located errors.

use retina_train::dataset::{DatasetFormat, check_images, read_labels};
use std::path::Path;

/// The default heads: diagnosis, fluid, vessel growth.
fn heads() -> Vec<retina_model::HeadSpec> {
    retina_model::HeadSpec::default_heads()
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn err(dir: &Path, format: DatasetFormat, text: &str) -> String {
    let p = write(dir, "labels.csv", text);
    read_labels(&p, format, None, &heads())
        .unwrap_err()
        .to_string()
}

#[test]
fn native_problems_are_located_by_line_and_column() {
    let d = tempfile::tempdir().unwrap();
    let e = err(d.path(), DatasetFormat::Native, "image,diagnosis,grade_x\n");
    assert!(e.ends_with("labels.csv:1:3: unknown column `grade_x` for the native format: expected [\"image\", \"patient\", \"diagnosis\", \"fluid\", \"vessel_growth\"]"), "{e}");
    let e = err(
        d.path(),
        DatasetFormat::Native,
        "image,diagnosis,fluid\na.png,2,1\nb.png,7,0\n",
    );
    assert!(
        e.contains(
            "labels.csv:3:2: column `diagnosis`: expected a class of `diagnosis`: an integer 0-4"
        ) && e.ends_with("found `7`"),
        "{e}"
    );
    let e = err(
        d.path(),
        DatasetFormat::Native,
        "image,diagnosis,vessel_growth\na.png,4,lots\n",
    );
    assert!(
        e.contains(
            ":2:3: column `vessel_growth`: expected a number for `vessel_growth`, found `lots`"
        ),
        "{e}"
    );
    let e = err(
        d.path(),
        DatasetFormat::Native,
        "image,diagnosis\na.png,1\nb.png,0\na.png,2\n",
    );
    assert!(
        e.contains(":4:1: duplicate image") && e.contains("first listed on line 2"),
        "{e}"
    );
    let e = err(
        d.path(),
        DatasetFormat::Native,
        "image,diagnosis\na.png,1.5\n",
    );
    assert!(e.contains(":2:2:"), "{e}");
    let e = err(
        d.path(),
        DatasetFormat::Native,
        "image,diagnosis\na.png,1,extra\n",
    );
    assert!(e.contains(":2:3: expected 2 fields, found 3"), "{e}");
    // A missing label is an empty field; a short row is refused, not read as unlabelled.
    let e = err(
        d.path(),
        DatasetFormat::Native,
        "image,diagnosis,vessel_growth,fluid
e4.jpg,2,,
e5.jpg,2
",
    );
    assert!(
        e.contains("labels.csv:3:2: expected 4 fields, found 2"),
        "{e}"
    );
    let e = err(
        d.path(),
        DatasetFormat::Native,
        "image,diagnosis,vessel_growth
a.png,1,1.5
",
    );
    assert!(e.contains(":2:3:") && e.contains("must lie in 0..1"), "{e}");
    let e = err(d.path(), DatasetFormat::Native, "");
    assert!(e.contains(":1:1: the file is empty"), "{e}");
    // A header alone is named as such, not found later as "no training samples".
    let e = err(d.path(), DatasetFormat::Native, "image,diagnosis\n\n");
    assert!(
        e.contains("labels.csv:") && e.contains("a header but no rows"),
        "{e}"
    );
    let e = err(d.path(), DatasetFormat::Aptos, "id_code\nabc\n");
    assert!(e.contains("missing column `diagnosis`"), "{e}");
}

#[test]
fn blank_cells_are_missing_labels_not_zero() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "labels.csv",
        "image,diagnosis,vessel_growth,fluid\na.png,4,,1\nb.png,0,0,\n\n",
    );
    let f = read_labels(&p, DatasetFormat::Native, None, &heads()).unwrap();
    assert_eq!(f.samples.len(), 2);
    assert_eq!(f.samples[0].labels.get("vessel_growth"), None);
    assert_eq!(f.samples[0].labels.get("fluid"), Some(&1.0));
    assert_eq!(f.samples[1].labels.get("vessel_growth"), Some(&0.0));
    assert_eq!(f.samples[1].labels.get("fluid"), None);
    assert_eq!(f.samples[0].image, d.path().join("a.png"));
    // A missing image file is reported at its label line.
    let e = check_images(&f).unwrap_err().to_string();
    assert!(
        e.contains("labels.csv:2:1: image file") && e.contains("a.png"),
        "{e}"
    );
}

#[test]
fn public_formats_parse() {
    let d = tempfile::tempdir().unwrap();
    // IDRiD: trailing spaces in header cells, trailing empty columns.
    let p = write(
        d.path(),
        "idrid.csv",
        "Image name,Retinopathy grade,Risk of macular edema ,,\nIDRiD_001,3,2,,\nIDRiD_002,0,0,,\n",
    );
    let f = read_labels(&p, DatasetFormat::Idrid, None, &heads()).unwrap();
    assert_eq!(f.samples[0].image, d.path().join("images/IDRiD_001.jpg"));
    assert_eq!(f.samples[0].labels.get("fluid"), Some(&1.0));
    assert_eq!(f.samples[1].labels.get("fluid"), Some(&0.0));

    // EyePACS: patients from the image names.
    let p = write(
        d.path(),
        "trainLabels.csv",
        "image,level\n10_left,0\n10_right,2\n13_left,1\n",
    );
    let f = read_labels(
        &p,
        DatasetFormat::Eyepacs,
        Some(Path::new("/data/eyepacs")),
        &heads(),
    )
    .unwrap();
    assert_eq!(f.samples[1].image, Path::new("/data/eyepacs/10_right.jpeg"));
    assert_eq!(f.samples[0].patient.as_deref(), Some("10"));
    assert_eq!(f.samples[2].patient.as_deref(), Some("13"));
    assert_eq!(
        f.samples[1].labels.get("fluid"),
        None,
        "EyePACS has no edema label"
    );

    // Messidor-2: ungradable rows are skipped and counted; DME is the fluid label.
    let p = write(
        d.path(),
        "messidor.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\nIM1.png,0,0,1\nIM2.JPG,,,0\nIM3.png,3,1,1\n",
    );
    let f = read_labels(&p, DatasetFormat::Messidor2, None, &heads()).unwrap();
    assert_eq!((f.samples.len(), f.skipped_ungradable), (2, 1));
    assert_eq!(f.samples[1].labels.get("fluid"), Some(&1.0));

    // DDR: `name label`, 5 = ungradable.
    let p = write(
        d.path(),
        "train.txt",
        "007-1.jpg 2\n007-2.jpg 5\n008-1.jpg 0\n",
    );
    let f = read_labels(&p, DatasetFormat::Ddr, None, &heads()).unwrap();
    assert_eq!((f.samples.len(), f.skipped_ungradable), (2, 1));
    let p = write(d.path(), "bad.txt", "007-1.jpg 2\n007-2.jpg\n");
    let e = read_labels(&p, DatasetFormat::Ddr, None, &heads())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.txt:2:1: expected `image label`"), "{e}");

    // APTOS.
    let p = write(d.path(), "train.csv", "id_code,diagnosis\n000c1434d8d7,2\n");
    let f = read_labels(&p, DatasetFormat::Aptos, None, &heads()).unwrap();
    assert_eq!(
        f.samples[0].image,
        d.path().join("train_images/000c1434d8d7.png")
    );
}

#[test]
fn format_names_parse() {
    assert_eq!(
        "EyePACS".parse::<DatasetFormat>().unwrap(),
        DatasetFormat::Eyepacs
    );
    assert!(
        "kaggle"
            .parse::<DatasetFormat>()
            .unwrap_err()
            .contains("choose")
    );
}
