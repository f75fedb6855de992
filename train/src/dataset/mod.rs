//! Labelled retina data sets: label-file formats and samples.

pub mod format;

pub use format::{DataError, DatasetFormat, LabelFile, Sample, check_images, read_labels};

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Hash of a sample set: image file names and labels, in order (names a data set in provenance
/// and reports without naming the machine it sits on).
pub fn content_hash(samples: &[Sample]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for s in samples {
        // The file name, not the folder: the same data set hashes the same wherever it sits.
        let name = s.image.file_name().unwrap_or(s.image.as_os_str());
        h = fnv1a(name.to_string_lossy().as_bytes(), h);
        for (k, v) in &s.labels {
            h = fnv1a(k.as_bytes(), h);
            h = fnv1a(&v.to_le_bytes(), h);
        }
    }
    format!("fnv1a64:{h:016x}")
}
