//! # retina-infer
//!
//! Inference for the Retina network: predictions for single images or folders on the CPU or
//! the GPU ([`engine`]), Grad-CAM explanations ([`heatmap`]) and
//! the inference benchmark ([`bench`]).

pub mod bench;
pub mod cli;
pub mod engine;
pub mod heatmap;

pub use retina_model::burn;
