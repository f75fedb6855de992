//! # retina-train
//!
//! Training, evaluation and data tooling for the Retina network: a procedural fundus generator
//! with known ground truth ([`synth`]), readers for the public data sets' label files
//! ([`dataset`]), the multi-head objective ([`loss`]), the data pipeline ([`data`]), the
//! training loop ([`trainer`]), screening metrics ([`metrics`]) and the benchmark ([`bench`](mod@bench)).

pub mod bench;
pub mod calibration;
pub mod cli;
pub mod config;
pub mod data;
pub mod dataset;
pub mod degrade;
pub mod distill;
pub mod distributed;
pub mod eval;
pub mod gallery;
pub mod loss;
pub mod metrics;
pub mod plots;
pub mod scoring;
pub mod store;
pub mod synth;
pub mod trainer;
pub mod util;

pub use retina_model::burn;
