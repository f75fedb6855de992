//! The multi-head network: one trunk, any number of heads on any stage.

use crate::config::{ConfigError, HeadKind, HeadSpec, RetinaConfig};
use crate::head::Head;
use crate::trunk::Trunk;
use burn::prelude::*;

/// The Retina network.
#[derive(Module, Debug)]
pub struct RetinaNet {
    /// The shared trunk.
    pub trunk: Trunk,
    /// One runtime head per [`HeadSpec`], in the same order.
    pub heads: Vec<Head>,
    /// The specs the heads were built from (names, kinds, attach points).
    #[module(skip)]
    pub specs: Vec<HeadSpec>,
}

/// Everything one forward pass produces.
#[derive(Debug, Clone)]
pub struct RetinaOutput {
    /// Each head's raw output `[N, width]`, in spec order.
    pub heads: Vec<Tensor<2>>,
    /// The pooled output of each computed stage, `[N, C_k]` (`embeddings[k-1]` is stage k).
    /// A loss may be put on any of them, not only on the heads.
    pub embeddings: Vec<Tensor<2>>,
    /// Head names, in the order of `heads`.
    pub names: Vec<String>,
}

impl RetinaOutput {
    /// The raw output of the head called `name`.
    pub fn head(&self, name: &str) -> Option<&Tensor<2>> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.heads[i])
    }
}

impl RetinaConfig {
    /// Validates the config and builds the network on `device`.
    pub fn init(&self, device: &Device) -> Result<RetinaNet, ConfigError> {
        self.validate()?;
        let trunk = self.trunk.init(device);
        let n = self.trunk.stages.len();
        let heads = self
            .heads
            .iter()
            .map(|h| h.init(self.trunk.stage_width(h.attach.stage_index(n)), device))
            .collect();
        Ok(RetinaNet {
            trunk,
            heads,
            specs: self.heads.clone(),
        })
    }
}

impl RetinaNet {
    /// Runs the network on a preprocessed batch `[N, 3, S, S]`.
    pub fn forward(&self, images: Tensor<4>) -> RetinaOutput {
        let n = self.trunk.stages.len();
        // Stop after the deepest stage any head reads.
        let last = self
            .specs
            .iter()
            .map(|s| s.attach.stage_index(n))
            .max()
            .unwrap_or(n);
        let embeddings: Vec<Tensor<2>> = self.trunk.forward_pooled(images, last);
        let heads = self
            .heads
            .iter()
            .zip(&self.specs)
            .map(|(head, spec)| head.forward(embeddings[spec.attach.stage_index(n) - 1].clone()))
            .collect();
        RetinaOutput {
            heads,
            embeddings,
            names: self.specs.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// Sum of squares of every trainable parameter (conv and linear weights and biases, batch-norm
    /// gamma and beta; not the running statistics, which are not parameters). The explicit L2
    /// term of the training loss.
    pub fn l2_sum_of_squares(&self) -> Tensor<1> {
        let mut v = TrainableVisitor::new(true);
        self.visit(&mut v);
        v.sum.expect("a RetinaNet always has parameters")
    }

    /// Number of trainable scalars (PyTorch's `sum(p.numel() for p in parameters())`).
    pub fn parameter_count(&self) -> usize {
        let mut v = TrainableVisitor::new(false);
        self.visit(&mut v);
        v.count
    }

    /// The kind of each head, in order.
    pub fn head_kinds(&self) -> Vec<HeadKind> {
        self.specs.iter().map(|s| s.kind).collect()
    }
}

/// Visits trainable parameters only: burn hands batch-norm running statistics to visitors as
/// float tensors too, but they are buffers, not weights, and must stay out of the L2 term.
struct TrainableVisitor {
    path: Vec<String>,
    want_sum: bool,
    sum: Option<Tensor<1>>,
    count: usize,
}

impl TrainableVisitor {
    fn new(want_sum: bool) -> Self {
        TrainableVisitor {
            path: Vec::new(),
            want_sum,
            sum: None,
            count: 0,
        }
    }
}

impl burn::module::ModuleVisitor for TrainableVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if self.path.last().is_some_and(|n| n.starts_with("running_")) {
            return;
        }
        self.count += param.lazy_shape().num_elements();
        if self.want_sum {
            let t = param.val();
            let sq = (t.clone() * t).sum();
            self.sum = Some(match self.sum.take() {
                Some(s) => s + sq,
                None => sq,
            });
        }
    }
}
