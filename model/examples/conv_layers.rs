//! Times every convolution shape of the reference trunk on the CPU and prints GFLOP/s per layer:
//! forward alone and forward + backward through the NCHW (`gemm`) kernels, and the inference
//! unit as the trunk runs it (channels-last, batch norm folded, kernel packed once: the direct
//! or Winograd kernel, whose GFLOP/s count a direct convolution's arithmetic). Shows where a
//! training step or an inference pass loses time to a kernel rather than to what is around it.
//!
//! `cargo run --release --example conv_layers -p retina-model -- [image_size] [batch]`

use retina_model::RetinaConfig;
use retina_model::burn::prelude::*;
use retina_model::burn::tensor::Distribution;
use retina_model::conv::conv2d;
use retina_model::norm::conv_bn_channels_last;
use retina_model::unit_cache::UnitCache;
use std::time::Instant;

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

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map_or(128, |s| s.parse().expect("image size"));
    let n: usize = args.next().map_or(16, |s| s.parse().expect("batch"));
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let mut config = RetinaConfig::preset("reference").expect("preset");
    config.preprocess.image_size = size;
    let net = config.init(&device).expect("network");
    let net_ad = config.init(&ad).expect("network");
    let mut convs_ad = vec![net_ad.trunk.stem.conv.clone()];
    for block in net_ad.trunk.stages.iter().flat_map(|s| &s.blocks) {
        convs_ad.push(block.conv1.clone());
        convs_ad.extend(block.downsample.as_ref().map(|d| d.conv.clone()));
        convs_ad.push(block.conv2.clone());
    }
    let mut layers = vec![(
        "stem".to_string(),
        net.trunk.stem.conv.clone(),
        net.trunk.stem.bn.clone(),
        3,
        size,
    )];
    let mut hw = size.div_ceil(2);
    let mut cin = net.trunk.stem.conv.weight.dims()[0];
    for (s, stage) in net.trunk.stages.iter().enumerate() {
        for (b, block) in stage.blocks.iter().enumerate() {
            let name = format!("stage{}.{}", s + 1, b);
            layers.push((
                format!("{name}.conv1"),
                block.conv1.clone(),
                block.bn1.clone(),
                cin,
                hw,
            ));
            let out_hw = hw.div_ceil(block.conv1.stride[0]);
            if let Some(d) = &block.downsample {
                layers.push((
                    format!("{name}.down"),
                    d.conv.clone(),
                    d.bn.clone(),
                    cin,
                    hw,
                ));
            }
            cin = block.conv1.weight.dims()[0];
            hw = out_hw;
            layers.push((
                format!("{name}.conv2"),
                block.conv2.clone(),
                block.bn2.clone(),
                cin,
                hw,
            ));
        }
    }
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
        let infer = best_of(20, || {
            let _ = cache
                .conv_bn(&conv, &bn, xl.clone(), None, true)
                .unwrap_or_else(|| {
                    conv_bn_channels_last(&conv, &bn, xl.clone(), None, true)
                        .expect("a channels-last unit")
                });
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
