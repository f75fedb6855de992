//! Labelled retina data sets: label-file formats and samples.

pub mod format;

pub use format::{DataError, DatasetFormat, LabelFile, Sample, check_images, read_labels};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

/// Content hashes (XXH3-128) of the image files read so far, keyed by path.
///
/// The loader records each file's bytes as it decodes them, so naming a data set by what its
/// images hold costs no second read of the data; only files the run never decoded (sampling can
/// leave some out of an epoch) are read again when the hash is asked for.
#[derive(Debug, Default)]
pub struct ImageHashes(Mutex<HashMap<PathBuf, u128>>);

impl ImageHashes {
    /// Records the bytes just read from `path`; returns their hash.
    pub fn record(&self, path: &Path, bytes: &[u8]) -> u128 {
        let h = xxh3_128(bytes);
        self.insert(path, h);
        h
    }

    /// Records a hash computed elsewhere (a prepared store's).
    pub fn insert(&self, path: &Path, hash: u128) {
        self.0
            .lock()
            .expect("hash lock")
            .insert(path.to_path_buf(), hash);
    }

    /// The hash of `path`'s bytes, reading the file when it was not recorded; `None` when it
    /// cannot be read (a skipped bad image).
    pub fn get_or_read(&self, path: &Path) -> Option<u128> {
        if let Some(h) = self.0.lock().expect("hash lock").get(path) {
            return Some(*h);
        }
        let bytes = std::fs::read(path).ok()?;
        Some(self.record(path, &bytes))
    }
}

/// Hash of a sample set: each image's file name and bytes, and its labels, in order. Names a
/// data set in provenance and reports without naming the machine it sits on, and changes when
/// an image is replaced under the same name.
pub fn content_hash(samples: &[Sample], images: &ImageHashes) -> String {
    let mut h = Xxh3::new();
    for s in samples {
        // The file name, not the folder: the same data set hashes the same wherever it sits.
        let name = s.image.file_name().unwrap_or(s.image.as_os_str());
        h.update(name.to_string_lossy().as_bytes());
        h.update(&[0]);
        match images.get_or_read(&s.image) {
            Some(bytes) => h.update(&bytes.to_le_bytes()),
            None => h.update(b"unreadable"),
        }
        for (k, v) in &s.labels {
            h.update(k.as_bytes());
            h.update(&v.to_le_bytes());
        }
    }
    format!("xxh3-128:{:032x}", h.digest128())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sample(path: &Path, grade: f32) -> Sample {
        Sample {
            image: path.to_path_buf(),
            labels: BTreeMap::from([("diagnosis".to_string(), grade)]),
            patient: None,
            line: 1,
        }
    }

    #[test]
    fn the_hash_covers_image_bytes_names_and_labels_not_folders() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [&a, &b] {
            std::fs::write(d.path().join("e1.png"), b"pixels one").unwrap();
        }
        let hash = |dir: &Path, grade| {
            content_hash(
                &[sample(&dir.join("e1.png"), grade)],
                &ImageHashes::default(),
            )
        };
        let base = hash(a.path(), 2.0);
        assert!(base.starts_with("xxh3-128:"), "{base}");
        assert_eq!(base, hash(b.path(), 2.0), "the folder must not matter");
        assert_ne!(base, hash(a.path(), 3.0), "a label changed");
        std::fs::write(b.path().join("e1.png"), b"pixels two").unwrap();
        assert_ne!(
            base,
            hash(b.path(), 2.0),
            "an image replaced under the same name"
        );
        // Recorded bytes are used as they were read, without a second read.
        let seen = ImageHashes::default();
        seen.record(&a.path().join("e1.png"), b"pixels two");
        let recorded = content_hash(&[sample(&a.path().join("e1.png"), 2.0)], &seen);
        assert_eq!(recorded, hash(b.path(), 2.0));
    }
}
