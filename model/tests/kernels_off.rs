//! The whole network with the CPU kernels switched off (burn's own `Conv2d`, `BatchNorm` and
//! ReLU) against the same network with them on: inference outputs and embeddings, and a training
//! step's outputs, parameter gradients and running statistics.
//!
//! Tolerances: the kernels sum in other orders than burn (the folded batch norm, Winograd's
//! transforms, `gemm`'s blocking, the fused batch norm's one-pass statistics), so the two agree
//! only to f32 rounding grown over the depth of the trunk. Inference outputs: within 1e-4 of
//! the largest value (the trunk tests' bound for channels-last against NCHW). Training: the
//! outputs likewise; the gradients within 5e-3 of the tensor's largest value, because the
//! output gradient of a batch norm has zero mean per channel, so the gradients are small sums of
//! large cancelling terms (the whole-network training test measured 0.5-1.1e-3 between burn on
//! NdArray and the kernels). The stem convolution's bias feeds a batch norm, which removes any
//! per-channel constant, so its gradient is zero up to rounding on both sides (measured: 8.5e-6
//! apart, over 5e-3 of a 1e-3 floor): the gradients' scale has a floor of 1e-2, so that noise is
//! not measured against itself. A kernel that is wrong (a misplaced index, a missing term, a wrong
//! statistic) differs by the order of the values themselves.

mod common;

use retina_kernels::Layout;
use retina_model::burn::module::{Module, ModuleVisitor, Param, RunningState};
use retina_model::burn::prelude::*;
use retina_model::burn::tensor::Gradients;
use retina_model::*;
use std::path::Path;

const SIZE: usize = 32;
const BATCH: usize = 2;

fn tensor<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(common::lcg_values(n, seed), shape), device)
}

fn host<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone().into_data().try_into_vec_as::<f32>().unwrap()
}

/// Panics unless `a` and `b` agree within `tol` of `b`'s largest magnitude (at least `floor`).
fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32, floor: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{what} ({} values): max |diff| {worst} (scale {scale})",
        a.len()
    );
}

/// The small preset at 32 px, seeded weights, and batch norms away from their initial state
/// (so the folded and fused forms matter), saved as a bundle so every run starts from the same
/// values without sharing running statistics.
fn saved_network(dir: &Path) -> std::path::PathBuf {
    let mut config = RetinaConfig::preset("small").unwrap();
    config.preprocess.image_size = SIZE;
    let device = Device::flex();
    device.seed(11);
    let mut net = config.init(&device).unwrap();
    let trunk = &mut net.trunk;
    let mut bns = vec![&mut trunk.stem.bn];
    for block in trunk.stages.iter_mut().flat_map(|s| s.blocks.iter_mut()) {
        bns.push(&mut block.bn1);
        bns.push(&mut block.bn2);
        if let Some(d) = &mut block.downsample {
            bns.push(&mut d.bn);
        }
    }
    for (i, bn) in bns.into_iter().enumerate() {
        let c = bn.gamma.dims()[0];
        let seed = 100 + 10 * i as u64;
        bn.gamma = Param::from_tensor(tensor([c], seed, &device).mul_scalar(0.3).add_scalar(1.0));
        bn.beta = Param::from_tensor(tensor([c], seed + 1, &device).mul_scalar(0.2));
        bn.running_mean = RunningState::new(tensor([c], seed + 2, &device).mul_scalar(0.3));
        bn.running_var = RunningState::new(tensor([c], seed + 3, &device).abs().add_scalar(0.5));
    }
    let path = dir.join("bundle");
    ModelBundle::new(net, BundleMetadata::new(config))
        .save(&path)
        .unwrap();
    path
}

/// Heads' outputs, then the pooled embeddings.
fn outputs(out: &RetinaOutput) -> Vec<(String, Vec<f32>)> {
    let heads = out
        .names
        .iter()
        .zip(&out.heads)
        .map(|(n, h)| (n.clone(), host(h)));
    let embeddings = out
        .embeddings
        .iter()
        .enumerate()
        .map(|(k, e)| (format!("embedding of stage {}", k + 1), host(e)));
    heads.chain(embeddings).collect()
}

#[test]
fn inference_with_the_kernels_off_matches_the_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_network(dir.path());
    let device = Device::flex();
    let net = ModelBundle::load(&path, &device).unwrap().model;
    let x = tensor([BATCH, 3, SIZE, SIZE], 7, &device);
    assert_eq!(net.trunk.plan(&x).layout(), Layout::ChannelsLastInference);
    let on = outputs(&net.forward(x.clone()));
    let off = {
        let _off = retina_kernels::scoped(false);
        assert_eq!(net.trunk.plan(&x).layout(), Layout::Nchw);
        outputs(&net.forward(x))
    };
    assert_eq!(on.len(), net.heads.len() + net.trunk.stages.len());
    for ((what, a), (_, b)) in on.iter().zip(&off) {
        assert_close(what, a, b, 1e-4, 1e-3);
    }
}

/// Every float parameter's gradient and every running statistic, in visiting order.
struct Collect<'a> {
    grads: &'a Gradients,
    out: Vec<(String, bool, Vec<f32>)>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let (has_grad, v) = match t.grad(self.grads) {
            Some(g) => (true, host(&g)),
            None => (false, host(&t)), // buffers (running mean/var) have no gradient
        };
        self.out.push((format!("{:?}", param.id), has_grad, v));
    }
}

/// One training step from the bundle at `path`: outputs, then every parameter's gradient and
/// running statistic.
#[allow(clippy::type_complexity)]
fn training_step(path: &Path) -> (Vec<(String, Vec<f32>)>, Vec<(String, bool, Vec<f32>)>) {
    let device = Device::flex().autodiff();
    let net = ModelBundle::load(path, &device).unwrap().model;
    let x = tensor([BATCH, 3, SIZE, SIZE], 8, &device);
    let expected = if retina_kernels::enabled() {
        Layout::ChannelsLastTraining
    } else {
        Layout::Nchw
    };
    assert_eq!(net.trunk.plan(&x).layout(), expected);
    let out = net.forward(x);
    // Every output element weighted differently, so a misplaced gradient cannot cancel.
    let mut loss = net.l2_sum_of_squares().mul_scalar(1e-3);
    for (i, t) in out.heads.iter().chain(&out.embeddings).enumerate() {
        loss = loss + (t.clone() * tensor(t.dims(), 30 + i as u64, &device)).sum();
    }
    let outputs = outputs(&out);
    let grads = loss.backward();
    let mut collect = Collect {
        grads: &grads,
        out: Vec::new(),
    };
    net.visit(&mut collect);
    (outputs, collect.out)
}

#[test]
fn training_with_the_kernels_off_matches_the_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_network(dir.path());
    let (out_on, on) = training_step(&path);
    let (out_off, off) = {
        let _off = retina_kernels::scoped(false);
        training_step(&path)
    };
    for ((what, a), (_, b)) in out_on.iter().zip(&out_off) {
        assert_close(what, a, b, 1e-4, 1e-3);
    }
    assert_eq!(on.len(), off.len());
    let with_grad = |v: &[(String, bool, Vec<f32>)]| v.iter().filter(|p| p.1).count();
    assert_eq!(with_grad(&on), with_grad(&off));
    assert!(with_grad(&on) > 40, "gradients for {}", with_grad(&on));
    for ((name, grad, a), (_, _, b)) in on.iter().zip(&off) {
        let what = if *grad {
            "gradient"
        } else {
            "running statistic"
        };
        assert_close(&format!("{name} {what}"), a, b, 5e-3, 1e-2);
    }
}
