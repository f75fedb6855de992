//! # retina-infer
//!
//! Inference for the Retina network: predictions for single images or folders on the CPU or
//! the GPU ([`engine`]), Grad-CAM explanations ([`heatmap`]) and
//! the inference benchmark ([`bench`](mod@bench)), the HTTP service ([`serve`]) and a load-test client for
//! it ([`loadtest`]).

pub mod bench;
pub mod cli;
pub mod engine;
pub mod heatmap;
pub mod loadtest;
pub mod serve;

pub use retina_model::burn;
