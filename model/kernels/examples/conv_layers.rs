//! Times every convolution shape of the reference trunk on the CPU and prints GFLOP/s per layer:
//! forward alone and forward + backward through the NCHW (`gemm`) kernels, and the inference
//! unit as the trunk runs it (channels-last, batch norm folded, kernel packed once: the direct
//! or Winograd kernel, whose GFLOP/s count a direct convolution's arithmetic). Shows where a
//! training step or an inference pass loses time to a kernel rather than to what is around it.
//!
//! `cargo run --release --example conv_layers -p retina-kernels -- [image_size] [batch]`

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Distribution;
use retina_kernels::{Plan, UnitCache, conv2d};
use std::time::Instant;

/// The reference trunk (retina-model's `reference` preset, the PyTorch benchmark network): a
/// 3x3 stride-2 stem of 32 channels with a bias, then one BasicBlock per stage of these widths
/// and strides.
const STEM: usize = 32;
const STAGES: [(usize, usize); 4] = [(32, 1), (64, 2), (128, 2), (256, 2)];

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// A convolution of the trunk (PyTorch-default initialisation, padding `k / 2`).
fn conv(cin: usize, cout: usize, k: usize, stride: usize, bias: bool, device: &Device) -> Conv2d {
    let pad = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(bias)
        .init(device)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map_or(128, |s| s.parse().expect("image size"));
    let n: usize = args.next().map_or(16, |s| s.parse().expect("batch"));
    let device = Device::flex();
    let ad = device.clone().autodiff();
    // Every unit of the trunk: name, convolution, batch norm, input channels and size.
    let mut layers: Vec<(String, Conv2d, BatchNorm, usize, usize)> = Vec::new();
    let bn = |c: usize| BatchNormConfig::new(c).init(&device);
    layers.push((
        "stem".into(),
        conv(3, STEM, 3, 2, true, &device),
        bn(STEM),
        3,
        size,
    ));
    let (mut cin, mut hw) = (STEM, size.div_ceil(2));
    for (s, &(width, stride)) in STAGES.iter().enumerate() {
        let name = format!("stage{}.0", s + 1);
        layers.push((
            format!("{name}.conv1"),
            conv(cin, width, 3, stride, false, &device),
            bn(width),
            cin,
            hw,
        ));
        if stride != 1 || cin != width {
            layers.push((
                format!("{name}.down"),
                conv(cin, width, 1, stride, false, &device),
                bn(width),
                cin,
                hw,
            ));
        }
        (cin, hw) = (width, hw.div_ceil(stride));
        layers.push((
            format!("{name}.conv2"),
            conv(width, width, 3, 1, false, &device),
            bn(width),
            width,
            hw,
        ));
    }
    // Made on the autodiff device, so that their weights require a gradient and the weight
    // gradient is computed (and timed): `fork` keeps a parameter's `require_grad`, which a
    // weight made off autodiff never has.
    let convs_ad: Vec<Conv2d> = layers
        .iter()
        .map(|l| {
            let [cout, cin, k, _] = l.1.weight.dims();
            conv(cin, cout, k, l.1.stride[0], l.1.bias.is_some(), &ad)
        })
        .collect();
    println!(
        "{size} px, batch {n}: layer, shape, forward ms (GFLOP/s), forward+backward ms (GFLOP/s), \
         inference (channels-last, batch norm folded, kernel packed once) ms (GFLOP/s)"
    );
    let (mut tf, mut tb, mut ti, mut flops) = (0.0, 0.0, 0.0, 0.0);
    for ((name, conv, bn, cin, hw), conv_ad) in layers.into_iter().zip(convs_ad) {
        let [cout, _, k, _] = conv.weight.dims();
        let x = Tensor::<4>::random([n, cin, hw, hw], Distribution::Default, &device);
        let y = conv2d(&conv, x.clone());
        let [_, _, oh, ow] = y.dims();
        let f = 2.0 * (n * cout * oh * ow * cin * k * k) as f64;
        let fwd = best_of(5, || {
            let _ = conv2d(&conv, x.clone());
        });
        let xa = Tensor::<4>::random([n, cin, hw, hw], Distribution::Default, &ad).require_grad();
        let both = best_of(5, || {
            let y = conv2d(&conv_ad, xa.clone());
            let _ = y.sum().backward();
        });
        let xw = Tensor::<4>::random([n, cin, hw, hw], Distribution::Default, &ad);
        let dw_only = best_of(5, || {
            let y = conv2d(&conv_ad, xw.clone());
            let _ = y.sum().backward();
        });
        // Inference as the trunk runs it: channels-last, batch norm folded, ReLU in the output pass.
        // A contiguous channels-last input, as the previous unit leaves it (a permuted view would
        // time a transposing copy too).
        let xl = Tensor::<4>::random([n, hw, hw, cin], Distribution::Default, &device);
        // Through the trunk's cache of folded, packed kernels (warm after the first call), as
        // repeated inference runs; the packing itself is timed apart.
        let cache = UnitCache::default();
        let plan = Plan::new([(&conv, &bn)], &Tensor::<4>::zeros([1, cin, 1, 1], &device))
            .with_cache(&cache);
        let infer = best_of(20, || {
            let _ = plan.unit(&conv, &bn, xl.clone(), None, true);
        });
        tf += fwd;
        ti += infer;
        tb += both;
        flops += f;
        println!(
            "{name:14} {cin:4}->{cout:<4} {k}x{k}/{} {hw:4}px  {:7.2} ms ({:5.1})  {:7.2} ms ({:5.1})  dW {:6.2} ms  infer {:6.2} ms ({:5.1})",
            conv.stride[0],
            fwd * 1e3,
            f / fwd / 1e9,
            both * 1e3,
            3.0 * f / both / 1e9,
            (dw_only - fwd) * 1e3,
            infer * 1e3,
            f / infer / 1e9
        );
    }
    println!(
        "total          {:7.2} ms ({:5.1})  {:7.2} ms ({:5.1})  infer {:6.2} ms ({:5.1})",
        tf * 1e3,
        flops / tf / 1e9,
        tb * 1e3,
        3.0 * flops / tb / 1e9,
        ti * 1e3,
        flops / ti / 1e9
    );
}
