//! A prediction head: an optional hidden layer, then a linear output layer.

use crate::config::HeadSpec;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// The runtime head built from a [`HeadSpec`]. Its output is raw: logits for classification
/// heads, the value itself for regression heads. Turning outputs into probabilities is the job
/// of [`crate::Prediction`], so that losses get the numerically stable raw values.
#[derive(Module, Debug)]
pub struct Head {
    /// Optional hidden layer (Linear + ReLU).
    pub hidden: Option<Linear>,
    /// Output layer.
    pub out: Linear,
}

impl HeadSpec {
    /// Builds the head for an input embedding of width `input_width`.
    pub fn init(&self, input_width: usize, device: &Device) -> Head {
        let width = self.kind.output_width();
        match self.hidden {
            Some(h) => Head {
                hidden: Some(LinearConfig::new(input_width, h).init(device)),
                out: LinearConfig::new(h, width).init(device),
            },
            None => Head {
                hidden: None,
                out: LinearConfig::new(input_width, width).init(device),
            },
        }
    }
}

impl Head {
    /// `[N, input_width]` to `[N, output_width]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = match &self.hidden {
            Some(l) => relu(l.forward(x)),
            None => x,
        };
        self.out.forward(x)
    }
}
