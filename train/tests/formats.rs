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
    assert!(e.ends_with("labels.csv:1:3: unknown column `grade_x` for the native format: expected [\"image\", \"patient\", \"diagnosis\", \"fluid\", \"vessel_growth\", \"quality\"]"), "{e}");
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

/// Every row of a hand-written file of each public format: the image path, the grade and the
/// fluid label (or its absence), as the format's documentation defines them, checked one by one.
#[test]
fn every_row_of_each_public_format_reads_as_written() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    type Row<'a> = (&'a str, f32, Option<f32>);
    let check = |format: DatasetFormat, name: &str, text: &str, want: &[Row]| {
        let p = write(dir, name, text);
        let f = read_labels(&p, format, None, &heads()).unwrap();
        let got: Vec<(std::path::PathBuf, Option<f32>, Option<f32>)> = f
            .samples
            .iter()
            .map(|s| {
                // What the split and balanced sampling read: the same grade.
                assert_eq!(
                    s.grade().map(|g| g as f32),
                    s.labels.get("diagnosis").copied()
                );
                (
                    s.image.clone(),
                    s.labels.get("diagnosis").copied(),
                    s.labels.get("fluid").copied(),
                )
            })
            .collect();
        let want: Vec<(std::path::PathBuf, Option<f32>, Option<f32>)> = want
            .iter()
            .map(|(img, g, fl)| (dir.join(img), Some(*g), *fl))
            .collect();
        assert_eq!(got, want, "{format}");
    };
    check(
        DatasetFormat::Aptos,
        "train.csv",
        "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n0024cdab0c1e,1\n0083ee8054ee,0\n00a8624548a9,3\n",
        &[
            ("train_images/000c1434d8d7.png", 2.0, None),
            ("train_images/001639a390f0.png", 4.0, None),
            ("train_images/0024cdab0c1e.png", 1.0, None),
            ("train_images/0083ee8054ee.png", 0.0, None),
            ("train_images/00a8624548a9.png", 3.0, None),
        ],
    );
    check(
        DatasetFormat::Eyepacs,
        "trainLabels.csv",
        "image,level\n10_left,0\n10_right,0\n13_left,1\n15_right,2\n16_left,4\n17_right,3\n",
        &[
            ("train/10_left.jpeg", 0.0, None),
            ("train/10_right.jpeg", 0.0, None),
            ("train/13_left.jpeg", 1.0, None),
            ("train/15_right.jpeg", 2.0, None),
            ("train/16_left.jpeg", 4.0, None),
            ("train/17_right.jpeg", 3.0, None),
        ],
    );
    // IDRiD: edema risk 0 is no fluid; 1 and 2 are fluid.
    check(
        DatasetFormat::Idrid,
        "idrid_labels.csv",
        "Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,3,2\nIDRiD_002,3,1\nIDRiD_003,2,0\nIDRiD_004,0,0\nIDRiD_005,4,1\n",
        &[
            ("images/IDRiD_001.jpg", 3.0, Some(1.0)),
            ("images/IDRiD_002.jpg", 3.0, Some(1.0)),
            ("images/IDRiD_003.jpg", 2.0, Some(0.0)),
            ("images/IDRiD_004.jpg", 0.0, Some(0.0)),
            ("images/IDRiD_005.jpg", 4.0, Some(1.0)),
        ],
    );
    // Messidor-2: names keep their own extension; the ungradable row is skipped.
    check(
        DatasetFormat::Messidor2,
        "messidor_data.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n20051020_43808_0100_PP.png,0,0,1\nIM002385.JPG,2,1,1\n20051021_51000_0100_PP.png,,,0\nIM004176.JPG,4,0,1\n",
        &[
            ("images/20051020_43808_0100_PP.png", 0.0, Some(0.0)),
            ("images/IM002385.JPG", 2.0, Some(1.0)),
            ("images/IM004176.JPG", 4.0, Some(0.0)),
        ],
    );
    // DDR: `name label`, label 5 (ungradable) skipped.
    check(
        DatasetFormat::Ddr,
        "train.txt",
        "007-3711-200.jpg 0\n007-3712-200.jpg 3\n007-3713-200.jpg 5\n007-3714-200.jpg 4\n20170413102628830.jpg 1\n",
        &[
            ("images/007-3711-200.jpg", 0.0, None),
            ("images/007-3712-200.jpg", 3.0, None),
            ("images/007-3714-200.jpg", 4.0, None),
            ("images/20170413102628830.jpg", 1.0, None),
        ],
    );
}

/// Cases a mutation run of the parsers (`cargo mutants`) showed unchecked: grades off the
/// scale, rows one field short or long, bytes that are not text, patients.
#[test]
fn off_scale_grades_odd_rows_and_patients_are_read_or_refused_where_they_are() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // A public format's grade is an integer 0-4: each of these is refused at its cell.
    for bad in ["5", "-1", "2.5"] {
        let e = err(
            dir,
            DatasetFormat::Eyepacs,
            &format!("image,level\n10_left,0\n10_right,{bad}\n"),
        );
        assert!(
            e.contains("labels.csv:3:2:") && e.contains("expected a grade 0-4"),
            "{bad}: {e}"
        );
    }
    // DDR's scale goes to 5 (ungradable), no further.
    let p = write(dir, "ddr.txt", "a.jpg 2\nb.jpg 6\n");
    let e = read_labels(&p, DatasetFormat::Ddr, None, &heads())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ddr.txt:2:2: expected a grade 0-5"), "{e}");
    // One field short of the last label column is a short row, not a missing label.
    let e = err(
        dir,
        DatasetFormat::Native,
        "image,diagnosis,fluid\na.png,2,1\nb.png,2\n",
    );
    assert!(e.contains(":3:2: expected 3 fields, found 2"), "{e}");
    // An empty trailing field is tolerated (spreadsheets write them); a filled one is not.
    let p = write(dir, "trailing.csv", "image,diagnosis\na.png,1,\nb.png,2,\n");
    let f = read_labels(&p, DatasetFormat::Native, None, &heads()).unwrap();
    assert_eq!(f.samples.len(), 2);
    // Not UTF-8: located at the line of the first bad byte.
    let p = dir.join("latin1.csv");
    std::fs::write(&p, b"image,diagnosis\na.png,1\nb\xe9.png,2\n").unwrap();
    let e = read_labels(&p, DatasetFormat::Native, None, &heads())
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("latin1.csv:3:1: the file is not UTF-8 text"),
        "{e}"
    );
    // The native format's patient column groups eyes; a blank cell is no patient.
    let p = write(
        dir,
        "patients.csv",
        "image,patient,diagnosis\na.png,p1,1\nb.png, p1 ,2\nc.png,,0\n",
    );
    let f = read_labels(&p, DatasetFormat::Native, None, &heads()).unwrap();
    let patients: Vec<Option<&str>> = f.samples.iter().map(|s| s.patient.as_deref()).collect();
    assert_eq!(patients, [Some("p1"), Some("p1"), None]);
    // EyePACS: a patient only from `{id}_left` / `{id}_right`.
    let p = write(dir, "eyepacs.csv", "image,level\nscan_3,1\n10_left,0\n");
    let f = read_labels(&p, DatasetFormat::Eyepacs, None, &heads()).unwrap();
    assert_eq!(f.samples[0].patient, None);
    assert_eq!(f.samples[1].patient.as_deref(), Some("10"));
}
