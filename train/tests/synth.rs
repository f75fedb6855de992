//! The synthetic fundus generator: determinism, label rules, lesions really rendered, formats.

use retina_model::Grade;
use retina_train::dataset::{DatasetFormat, check_images, read_labels};
use retina_train::synth::{self, Layers, Scene, SynthOptions, render, scene_for};
use std::collections::BTreeMap;
use std::path::Path;

/// The default heads: diagnosis, fluid, vessel growth.
fn heads() -> Vec<retina_model::HeadSpec> {
    retina_model::HeadSpec::default_heads()
}

fn opts(out: &Path, count: usize, seed: u64, format: DatasetFormat) -> SynthOptions {
    SynthOptions {
        out: out.to_path_buf(),
        count,
        size: 64,
        seed,
        grades: [1.0; 5],
        missing: 0.0,
        ungradable: 0.0,
        format,
        progress: false,
    }
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walk(dir) {
        out.insert(
            e.strip_prefix(dir).unwrap().display().to_string(),
            std::fs::read(&e).unwrap(),
        );
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn same_seed_same_bytes_different_seed_different_images() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    synth::generate(&opts(a.path(), 6, 11, DatasetFormat::Native)).unwrap();
    synth::generate(&opts(b.path(), 6, 11, DatasetFormat::Native)).unwrap();
    synth::generate(&opts(c.path(), 6, 12, DatasetFormat::Native)).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    assert_eq!(fa.len(), 7, "six images and the label file");
    assert_eq!(fa, fb);
    let differing = fa.iter().filter(|(k, v)| fc.get(*k) != Some(v)).count();
    assert!(
        differing >= 6,
        "another seed must give other images ({differing} differ)"
    );
}

#[test]
fn labels_follow_the_grading_rules_and_the_requested_mix() {
    let mut counts = [0usize; 5];
    let n = 2000;
    for i in 0..n {
        let mut rng = synth::image_rng(5, i, 0);
        let t = synth::scene::draw_truth(&mut rng, &synth::SCREENING_MIX);
        counts[t.grade.index()] += 1;
        if t.grade == Grade::Proliferative {
            assert!(t.vessel_growth > 0.0 && t.vessel_growth <= 1.0);
        } else {
            assert_eq!(t.vessel_growth, 0.0, "vessel growth only at grade 4");
        }
        if t.grade == Grade::None {
            assert!(!t.fluid, "no edema at grade 0");
        }
    }
    for (g, want) in synth::SCREENING_MIX.iter().enumerate() {
        let got = counts[g] as f32 / n as f32;
        assert!((got - want).abs() < 0.025, "grade {g}: {got:.3} vs {want}");
    }
}

/// A mix is reported as percentages of its total, whatever scale its weights were given in.
#[test]
fn a_grade_mix_reads_as_percentages() {
    assert_eq!(
        synth::mix_percentages(&synth::TRAINING_MIX),
        "30/15/20/12.5/22.5"
    );
    assert_eq!(
        synth::mix_percentages(&[73.0, 7.0, 15.0, 2.5, 2.5]),
        "73/7/15/2.5/2.5"
    );
    assert_eq!(
        synth::mix_percentages(&[1.0, 1.0, 1.0, 0.0, 0.0]),
        "33.3/33.3/33.3/0/0"
    );
}

/// Pixels where the lesion layer made the image darker and redder: red lesions (microaneurysms,
/// haemorrhages, new vessels, beading).
fn red_lesion_pixels(scene: &Scene) -> usize {
    let with = render(scene, Layers { lesions: true });
    let without = render(scene, Layers { lesions: false });
    with.pixels()
        .zip(without.pixels())
        .filter(|(a, b)| {
            let dl = (b[0] as i32 + b[1] as i32) - (a[0] as i32 + a[1] as i32);
            dl > 25 && a[0] > a[2]
        })
        .count()
}

/// Pixels within 0.25 disc radii of the fovea that the lesion layer made brighter and yellower.
fn exudate_pixels_near_fovea(scene: &Scene) -> usize {
    let with = render(scene, Layers { lesions: true });
    let without = render(scene, Layers { lesions: false });
    let mut n = 0;
    for (x, y, a) in with.enumerate_pixels() {
        let b = without.get_pixel(x, y);
        let p = scene.to_fundus(x as f32 + 0.5, y as f32 + 0.5);
        let d = ((p.0 - scene.fovea.0).powi(2) + (p.1 - scene.fovea.1).powi(2)).sqrt();
        let brighter = (a[0] as i32 + a[1] as i32) - (b[0] as i32 + b[1] as i32);
        if d < 0.25 && brighter > 40 && a[1] as i32 - b[1] as i32 > 20 {
            n += 1;
        }
    }
    n
}

fn one_grade(g: usize) -> [f32; 5] {
    let mut m = [0.0; 5];
    m[g] = 1.0;
    m
}

#[test]
fn red_lesions_grow_with_grade() {
    let per_grade = 12;
    let mean: Vec<f32> = (0..5)
        .map(|g| {
            (0..per_grade)
                .map(|i| {
                    red_lesion_pixels(&scene_for(100 + g as u64, i, 160, &one_grade(g))) as f32
                })
                .sum::<f32>()
                / per_grade as f32
        })
        .collect();
    assert_eq!(mean[0], 0.0, "grade 0 has no lesions: {mean:?}");
    assert!(mean[1] > 0.0, "{mean:?}");
    assert!(mean[1] < mean[2] && mean[2] < mean[3], "{mean:?}");
    assert!(mean[4] > mean[1], "{mean:?}");
}

#[test]
fn exudates_near_the_fovea_appear_exactly_with_fluid() {
    let mut seen = [0usize; 2];
    for i in 0..30 {
        let s = scene_for(7, i, 160, &one_grade(2));
        let n = exudate_pixels_near_fovea(&s);
        if s.truth.fluid {
            assert!(
                n > 10,
                "image {i}: fluid but only {n} exudate pixels near the fovea"
            );
        } else {
            assert_eq!(
                n, 0,
                "image {i}: no fluid but {n} exudate pixels near the fovea"
            );
        }
        seen[s.truth.fluid as usize] += 1;
    }
    assert!(seen[0] > 0 && seen[1] > 0, "both cases exercised: {seen:?}");
}

#[test]
fn new_vessels_grow_with_vessel_growth() {
    let mut pairs: Vec<(f32, usize)> = (0..16)
        .map(|i| {
            let s = scene_for(21, i, 160, &one_grade(4));
            (s.truth.vessel_growth, s.new_vessels.len())
        })
        .collect();
    pairs.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let low: usize = pairs[..5].iter().map(|p| p.1).sum();
    let high: usize = pairs[11..].iter().map(|p| p.1).sum();
    assert!(high > 2 * low, "more growth, more new vessels: {pairs:?}");
}

/// What the non-proliferative lesions of a scene are, new vessels left out: the counts of each
/// lesion kind, and whether the veins are beaded.
fn npdr_signs(s: &Scene) -> (BTreeMap<String, usize>, bool) {
    let mut kinds = BTreeMap::new();
    for l in &s.lesions {
        *kinds.entry(format!("{:?}", l.kind)).or_insert(0) += 1;
    }
    (kinds, s.vessels.iter().any(|v| v.beading > 0.0))
}

/// A proliferative eye carries the lesions of a moderate or of a severe eye, both seen, so that
/// only the new vessels tell it from them: cotton-wool spots and beaded veins exactly with the
/// severe background, and never new vessels below grade 4.
#[test]
fn only_new_vessels_set_a_proliferative_eye_apart() {
    let mut backgrounds = BTreeMap::new();
    for i in 0..24 {
        let s = scene_for(31, i, 160, &one_grade(4));
        assert!(!s.new_vessels.is_empty(), "image {i}");
        let (kinds, beaded) = npdr_signs(&s);
        let cotton_wool = kinds.get("CottonWool").copied().unwrap_or(0);
        match s.npdr {
            Grade::Moderate => assert!(cotton_wool == 0 && !beaded, "image {i}: {kinds:?}"),
            Grade::Severe => assert!(cotton_wool > 0 && beaded, "image {i}: {kinds:?}"),
            other => panic!("image {i}: background {other:?}"),
        }
        *backgrounds.entry(format!("{:?}", s.npdr)).or_insert(0) += 1;
    }
    assert_eq!(
        backgrounds.len(),
        2,
        "both backgrounds drawn: {backgrounds:?}"
    );
    for g in 0..4 {
        for i in 0..6 {
            let s = scene_for(32, i, 160, &one_grade(g));
            assert_eq!(s.npdr.index(), g);
            assert!(s.new_vessels.is_empty(), "grade {g}, image {i}");
        }
    }
    // Below grade 4 too, cotton-wool spots and beading belong to the severe eye.
    let (moderate, beaded) = npdr_signs(&scene_for(33, 0, 160, &one_grade(2)));
    assert!(
        !moderate.contains_key("CottonWool") && !beaded,
        "{moderate:?}"
    );
    let (severe, beaded) = npdr_signs(&scene_for(33, 0, 160, &one_grade(3)));
    assert!(severe.contains_key("CottonWool") && beaded, "{severe:?}");
}

#[test]
fn every_format_parses_back_with_the_same_labels() {
    for format in [
        DatasetFormat::Native,
        DatasetFormat::Aptos,
        DatasetFormat::Eyepacs,
        DatasetFormat::Idrid,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), 10, 3, format);
        o.missing = 0.3;
        let written = synth::generate(&o).unwrap();
        let file = read_labels(
            &synth::label_path(dir.path(), format),
            format,
            None,
            &heads(),
        )
        .unwrap_or_else(|e| panic!("{format}: {e}"));
        check_images(&file).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(file.samples.len(), 10, "{format}");
        for (s, w) in file.samples.iter().zip(&written) {
            assert_eq!(s.grade(), Some(w.diagnosis as usize), "{format}");
            let fluid = s.labels.get("fluid").map(|v| *v > 0.5);
            let vg = s.labels.get("vessel_growth").copied();
            match format {
                DatasetFormat::Native => {
                    assert_eq!(fluid, w.fluid);
                    assert_eq!(
                        vg.map(|v| (v * 1e4).round()),
                        w.vessel_growth.map(|v| (v * 1e4).round())
                    );
                }
                DatasetFormat::Idrid => assert_eq!(fluid, w.fluid),
                _ => assert_eq!((fluid, vg), (None, None), "{format} carries only the grade"),
            }
            // The image decodes through the shared preprocessing.
            retina_model::PreprocessConfig::new()
                .with_image_size(32)
                .prepare_path(&s.image)
                .unwrap();
        }
        if format == DatasetFormat::Eyepacs {
            assert_eq!(
                file.samples[0].patient, file.samples[1].patient,
                "both eyes of a patient"
            );
            assert_ne!(file.samples[1].patient, file.samples[2].patient);
        }
    }
}

#[test]
fn missing_fraction_blanks_auxiliary_labels_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 40, 9, DatasetFormat::Native);
    o.missing = 0.5;
    let w = synth::generate(&o).unwrap();
    let blank_fluid = w.iter().filter(|l| l.fluid.is_none()).count();
    let blank_vg = w.iter().filter(|l| l.vessel_growth.is_none()).count();
    assert!(
        (8..=32).contains(&blank_fluid) && (8..=32).contains(&blank_vg),
        "{blank_fluid} {blank_vg}"
    );
    let csv = std::fs::read_to_string(dir.path().join("labels.csv")).unwrap();
    assert!(
        csv.lines()
            .skip(1)
            .all(|l| l.split(',').nth(1).is_some_and(|g| !g.is_empty()))
    );
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1, 0, DatasetFormat::Native);
    o.size = 8;
    assert!(
        synth::generate(&o)
            .unwrap_err()
            .to_string()
            .contains("--size")
    );
    let mut o = opts(dir.path(), 1, 0, DatasetFormat::Native);
    o.missing = 1.5;
    assert!(synth::generate(&o).is_err());
    assert!(retina_train::util::parse_grade_mix("1,2,3").is_err());
    assert!(retina_train::util::parse_grade_mix("1,0,0,0,-1").is_err());
    assert_eq!(
        retina_train::util::parse_grade_mix("1,1,0,0,2").unwrap(),
        [1.0, 1.0, 0.0, 0.0, 2.0]
    );
}
