//! Labelled retina data sets: label-file formats and samples.

pub mod format;

pub use format::{DataError, DatasetFormat, LabelFile, Sample, check_images, read_labels};
