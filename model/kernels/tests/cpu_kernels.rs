//! The CPU fast paths against burn's own modules on the same device and weights.
//!
//! - The im2col + gemm convolution against `Conv2d`: outputs, input gradients, weight and bias
//!   gradients, for every shape the trunk uses (3x3 stride 1 and 2, 1x1 stride 1 and 2, the
//!   3-channel stem) and for batches smaller and larger than the thread pool.
//! - The fused training-mode batch norm against `BatchNorm`: outputs, input, gamma and beta
//!   gradients, and the running statistics it leaves behind.
//! - The inference units (batch norm folded, NCHW and channels-last, per call and packed)
//!   against the composition of burn's modules.
//! - The plan's choices, and the switch that turns the kernels off.
//!
//! Tests that need a whole trunk are retina-model's (`model/tests/trunk_kernels.rs`).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use retina_kernels::conv::channels_last::{self, to_channels_first, to_channels_last};
use retina_kernels::plan::{conv_step, norm_step};
use retina_kernels::{ConvStep, Layout, NormStep, Path, Plan, UnitCache, conv2d, norm};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{what}: max |diff| {worst} (scale {scale})"
    );
}

struct Case {
    n: usize,
    cin: usize,
    cout: usize,
    hw: [usize; 2],
    k: usize,
    stride: usize,
    pad: usize,
    bias: bool,
}

/// The padding the plan gives the `gemm` convolution of `conv` on `x`; panics where it takes
/// burn's.
fn gemm_padding(conv: &Conv2d, x: &Tensor<4>) -> [usize; 2] {
    match conv_step(conv, x) {
        ConvStep::Gemm { padding } => padding,
        ConvStep::Burn => panic!("the fast path must apply here"),
    }
}

fn layer(c: &Case, device: &Device) -> Conv2d {
    Conv2dConfig::new([c.cin, c.cout], [c.k, c.k])
        .with_stride([c.stride, c.stride])
        .with_padding(PaddingConfig2d::Explicit(c.pad, c.pad, c.pad, c.pad))
        .with_bias(c.bias)
        .init(device)
}

/// Forward and backward through both paths on one autodiff Flex device with the same weights;
/// the loss weights every output element differently so a misplaced gradient cannot cancel.
fn check(c: Case) {
    let device = Device::flex().autodiff();
    let conv = layer(&c, &device);
    let [h, w] = c.hw;
    let x_vals = values(c.n * c.cin * h * w, 7);
    // 0: the NCHW fast path, 1: burn's `Conv2d`, 2: the channels-last training path.
    let run = |path: u8| {
        let conv = conv.clone();
        let x = Tensor::<1>::from_floats(x_vals.as_slice(), &device)
            .reshape([c.n, c.cin, h, w])
            .require_grad();
        if path != 1 {
            gemm_padding(&conv, &x);
        }
        let y = match path {
            0 => conv2d(&conv, x.clone()),
            1 => conv.forward(x.clone()),
            _ => {
                let padding = gemm_padding(&conv, &x);
                to_channels_first(channels_last::conv2d(
                    &conv,
                    to_channels_last(x.clone()),
                    padding,
                ))
            }
        };
        let dims = y.dims();
        let probe = Tensor::<1>::from_floats(values(dims.iter().product(), 11).as_slice(), &device)
            .reshape(dims);
        let grads = (y.clone() * probe).sum().backward();
        let dx = x.grad(&grads).unwrap();
        let dw = conv.weight.val().grad(&grads).unwrap();
        let db = conv
            .bias
            .as_ref()
            .map(|b| host(b.val().grad(&grads).unwrap()));
        (dims, host(y), host(dx), host(dw), db)
    };
    let (dims_r, y_r, dx_r, dw_r, db_r) = run(1);
    for path in [0, 2] {
        let (dims_f, y_f, dx_f, dw_f, db_f) = run(path);
        let label = format!(
            "{} n {} {}->{} {}x{} k{} s{} p{}",
            if path == 0 { "NCHW" } else { "channels-last" },
            c.n,
            c.cin,
            c.cout,
            h,
            w,
            c.k,
            c.stride,
            c.pad
        );
        assert_eq!(dims_f, dims_r, "{label}: output shape");
        assert_close(&format!("{label}: output"), &y_f, &y_r, 1e-5);
        assert_close(&format!("{label}: input gradient"), &dx_f, &dx_r, 1e-5);
        assert_close(&format!("{label}: weight gradient"), &dw_f, &dw_r, 1e-5);
        match (&db_f, &db_r) {
            (Some(a), Some(b)) => assert_close(&format!("{label}: bias gradient"), a, b, 1e-5),
            (None, None) => {}
            _ => panic!("{label}: bias gradient on one path only"),
        }
    }
}

#[test]
fn stem_3x3_stride_2_with_bias() {
    check(Case {
        n: 3,
        cin: 3,
        cout: 8,
        hw: [17, 16],
        k: 3,
        stride: 2,
        pad: 1,
        bias: true,
    });
}

#[test]
fn block_3x3_stride_1() {
    check(Case {
        n: 4,
        cin: 8,
        cout: 8,
        hw: [12, 12],
        k: 3,
        stride: 1,
        pad: 1,
        bias: false,
    });
}

#[test]
fn block_3x3_stride_2_odd_size() {
    check(Case {
        n: 5,
        cin: 6,
        cout: 10,
        hw: [13, 11],
        k: 3,
        stride: 2,
        pad: 1,
        bias: false,
    });
}

#[test]
fn batch_of_one_cuts_deep_and_strided_products_across_threads() {
    // One image: each product is cut into per-thread blocks, along the channels here.
    check(Case {
        n: 1,
        cin: 64,
        cout: 96,
        hw: [6, 6],
        k: 3,
        stride: 1,
        pad: 1,
        bias: false,
    });
    check(Case {
        n: 1,
        cin: 32,
        cout: 64,
        hw: [24, 20],
        k: 3,
        stride: 2,
        pad: 1,
        bias: false,
    });
}

#[test]
fn deep_3x3_with_more_channels_than_pixels() {
    // 40 output channels over 4x5 pixels: the product runs the other way round.
    check(Case {
        n: 3,
        cin: 24,
        cout: 40,
        hw: [4, 5],
        k: 3,
        stride: 1,
        pad: 1,
        bias: false,
    });
}

#[test]
fn shortcut_1x1_stride_2() {
    check(Case {
        n: 2,
        cin: 8,
        cout: 16,
        hw: [9, 10],
        k: 1,
        stride: 2,
        pad: 0,
        bias: false,
    });
}

#[test]
fn pointwise_1x1_stride_1() {
    check(Case {
        n: 3,
        cin: 5,
        cout: 7,
        hw: [6, 6],
        k: 1,
        stride: 1,
        pad: 0,
        bias: true,
    });
}

#[test]
fn batch_of_one_splits_the_product_instead() {
    check(Case {
        n: 1,
        cin: 16,
        cout: 32,
        hw: [20, 20],
        k: 3,
        stride: 1,
        pad: 1,
        bias: false,
    });
}

#[test]
fn unpadded_5x5() {
    check(Case {
        n: 2,
        cin: 4,
        cout: 3,
        hw: [9, 9],
        k: 5,
        stride: 1,
        pad: 0,
        bias: true,
    });
}

#[test]
fn inference_without_autodiff_matches() {
    let device = Device::flex();
    let c = Case {
        n: 2,
        cin: 4,
        cout: 6,
        hw: [10, 10],
        k: 3,
        stride: 2,
        pad: 1,
        bias: true,
    };
    let conv = layer(&c, &device);
    let x = Tensor::<1>::from_floats(values(2 * 4 * 100, 3).as_slice(), &device)
        .reshape([2, 4, 10, 10]);
    gemm_padding(&conv, &x);
    assert_close(
        "no autodiff",
        &host(conv2d(&conv, x.clone())),
        &host(conv.forward(x)),
        1e-5,
    );
}

#[test]
#[allow(deprecated)]
fn other_backends_use_burns_convolution() {
    // NdArray has no fast path: the same call must still give burn's answer there.
    let device = Device::ndarray();
    let c = Case {
        n: 1,
        cin: 2,
        cout: 3,
        hw: [5, 5],
        k: 3,
        stride: 1,
        pad: 1,
        bias: false,
    };
    let conv = layer(&c, &device).to_device(&device);
    let x = Tensor::<1>::from_floats(values(50, 5).as_slice(), &device).reshape([1, 2, 5, 5]);
    assert_eq!(conv_step(&conv, &x), ConvStep::Burn);
    assert_close(
        "ndarray",
        &host(conv2d(&conv, x.clone())),
        &host(conv.forward(x)),
        0.0,
    );
}

/// Batch norm through both paths from the same layer state; returns everything they produce.
/// Which fused form to check against burn's modules and operations.
#[derive(Clone, Copy, Debug)]
enum Form {
    Plain,
    Relu,
    AddRelu,
}

fn batch_norm_case(
    dims: [usize; 4],
    shift: f32,
    form: Form,
    device: &Device,
) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let c = dims[1];
    // A fresh layer per path: clones share their running statistics. Non-trivial gamma and beta,
    // so a swapped or missing term shows.
    let layer = || {
        let mut bn: BatchNorm = BatchNormConfig::new(c).with_momentum(0.2).init(device);
        let gamma = Tensor::<1>::from_floats(values(c, 21).as_slice(), device).add_scalar(1.0);
        bn.gamma = Param::from_tensor(gamma);
        bn.beta = Param::from_tensor(Tensor::<1>::from_floats(values(c, 22).as_slice(), device));
        bn
    };
    let n: usize = dims.iter().product();
    // 0: the NCHW fast path, 1: burn's `BatchNorm`, 2: the channels-last training path.
    let run = |path: u8| {
        let fast = path != 1;
        let bn = layer();
        // An offset mean per channel (and overall `shift`) checks the centring.
        let x = Tensor::<1>::from_floats(values(n, 9).as_slice(), device)
            .reshape(dims)
            .add_scalar(shift)
            + Tensor::<1>::from_floats(values(c, 23).as_slice(), device)
                .mul_scalar(3.0)
                .reshape([1, c, 1, 1]);
        let x = x.require_grad();
        let residual = Tensor::<1>::from_floats(values(n, 17).as_slice(), device)
            .reshape(dims)
            .require_grad();
        if fast {
            assert_eq!(
                norm_step(&bn, &x),
                NormStep::Training,
                "the fast path must apply here"
            );
        }
        let cl = |residual: Option<Tensor<4>>, relu: bool| {
            to_channels_first(norm::batch_norm_channels_last(
                &bn,
                to_channels_last(x.clone()),
                residual.map(to_channels_last),
                relu,
            ))
        };
        let y = match (form, fast) {
            (Form::Plain, true) if path == 2 => cl(None, false),
            (Form::Relu, true) if path == 2 => cl(None, true),
            (Form::AddRelu, true) if path == 2 => cl(Some(residual.clone()), true),
            (Form::Plain, true) => norm::batch_norm(&bn, x.clone()),
            (Form::Plain, false) => bn.forward(x.clone()),
            (Form::Relu, true) => norm::batch_norm_relu(&bn, x.clone()),
            (Form::Relu, false) => relu(bn.forward(x.clone())),
            (Form::AddRelu, true) => norm::batch_norm_add_relu(&bn, x.clone(), residual.clone()),
            (Form::AddRelu, false) => relu(bn.forward(x.clone()) + residual.clone()),
        };
        let probe = Tensor::<1>::from_floats(values(n, 13).as_slice(), device).reshape(dims);
        let grads = (y.clone() * probe).sum().backward();
        vec![
            host(y),
            host(x.grad(&grads).unwrap()),
            host(bn.gamma.val().grad(&grads).unwrap()),
            host(bn.beta.val().grad(&grads).unwrap()),
            host(bn.running_mean.value()),
            host(bn.running_var.value()),
            residual.grad(&grads).map(host).unwrap_or_default(),
        ]
    };
    let names = [
        "output",
        "input gradient",
        "gamma gradient",
        "beta gradient",
        "running mean",
        "running variance",
        "residual gradient",
    ];
    let reference = run(1);
    [0, 2]
        .into_iter()
        .flat_map(|path| {
            let layout = if path == 0 { "NCHW" } else { "channels-last" };
            names
                .iter()
                .zip(run(path).into_iter().zip(reference.clone()))
                .map(move |(name, (a, b))| (format!("{layout} {form:?} {dims:?}: {name}"), a, b))
        })
        .collect()
}

#[test]
fn fused_batch_norm_matches_burns_in_training() {
    let device = Device::flex().autodiff();
    for (dims, shift) in [
        ([4, 8, 6, 6], 0.0),
        ([3, 5, 7, 9], 40.0),
        ([1, 4, 3, 3], -2.0),
        ([16, 2, 1, 1], 1.0),
    ] {
        for form in [Form::Plain, Form::Relu, Form::AddRelu] {
            for (what, fast, reference) in batch_norm_case(dims, shift, form, &device) {
                assert_close(&what, &fast, &reference, 2e-5);
            }
        }
    }
}

#[test]
fn batch_norm_outside_training_is_burns_own() {
    let bn: BatchNorm = BatchNormConfig::new(3).init(&Device::flex());
    let x = Tensor::<1>::from_floats(values(2 * 3 * 4 * 4, 4).as_slice(), &Device::flex())
        .reshape([2, 3, 4, 4]);
    assert_ne!(
        norm_step(&bn, &x),
        NormStep::Training,
        "inference needs no batch statistics"
    );
    let on_autodiff = Tensor::<4>::zeros([2, 3, 4, 4], &Device::flex().autodiff());
    assert_eq!(
        norm_step(
            &bn.clone().to_device(&Device::flex().autodiff()),
            &on_autodiff
        ),
        NormStep::Training
    );
}

#[test]
fn inference_batch_norm_matches_burns_from_running_statistics() {
    use burn::module::RunningState;
    let device = Device::flex();
    let (dims, c) = ([3, 6, 5, 7], 6);
    let mut bn: BatchNorm = BatchNormConfig::new(c).with_epsilon(1e-3).init(&device);
    let t = |seed: u64| Tensor::<1>::from_floats(values(c, seed).as_slice(), &device);
    bn.gamma = Param::from_tensor(t(31).add_scalar(1.0));
    bn.beta = Param::from_tensor(t(32));
    bn.running_mean = RunningState::new(t(33).mul_scalar(4.0));
    bn.running_var = RunningState::new(t(34).abs().add_scalar(0.2));
    let n: usize = dims.iter().product();
    let x = Tensor::<1>::from_floats(values(n, 35).as_slice(), &device).reshape(dims);
    let r = Tensor::<1>::from_floats(values(n, 36).as_slice(), &device).reshape(dims);
    assert_eq!(norm_step(&bn, &x), NormStep::Inference);
    let cases = [
        (
            "plain",
            norm::batch_norm(&bn, x.clone()),
            bn.forward(x.clone()),
        ),
        (
            "relu",
            norm::batch_norm_relu(&bn, x.clone()),
            relu(bn.forward(x.clone())),
        ),
        (
            "add relu",
            norm::batch_norm_add_relu(&bn, x.clone(), r.clone()),
            relu(bn.forward(x.clone()) + r),
        ),
    ];
    for (what, fast, reference) in cases {
        assert_close(what, &host(fast), &host(reference), 1e-5);
    }
}

#[test]
fn inference_conv_with_folded_batch_norm_matches_the_composition() {
    use burn::module::RunningState;
    let device = Device::flex();
    // Shifted windows (both orientations), strided 3x3 through patches, strided 1x1, with and
    // without a conv bias.
    let cases = [
        Case {
            n: 2,
            cin: 5,
            cout: 8,
            hw: [9, 8],
            k: 3,
            stride: 1,
            pad: 1,
            bias: true,
        },
        Case {
            n: 2,
            cin: 6,
            cout: 40,
            hw: [4, 4],
            k: 3,
            stride: 1,
            pad: 1,
            bias: false,
        },
        Case {
            n: 3,
            cin: 3,
            cout: 8,
            hw: [11, 10],
            k: 3,
            stride: 2,
            pad: 1,
            bias: true,
        },
        Case {
            n: 2,
            cin: 4,
            cout: 6,
            hw: [8, 8],
            k: 1,
            stride: 2,
            pad: 0,
            bias: false,
        },
        // A batch of one (products and output passes split across threads), in both
        // orientations; more channels than pixels through patches and through subsampling; 1x1
        // stride 1.
        Case {
            n: 1,
            cin: 8,
            cout: 16,
            hw: [12, 13],
            k: 3,
            stride: 1,
            pad: 1,
            bias: false,
        },
        Case {
            n: 1,
            cin: 8,
            cout: 64,
            hw: [5, 5],
            k: 3,
            stride: 2,
            pad: 1,
            bias: true,
        },
        Case {
            n: 1,
            cin: 4,
            cout: 40,
            hw: [6, 6],
            k: 1,
            stride: 2,
            pad: 0,
            bias: false,
        },
        Case {
            n: 2,
            cin: 6,
            cout: 5,
            hw: [6, 7],
            k: 1,
            stride: 1,
            pad: 0,
            bias: true,
        },
    ];
    for c in cases {
        let conv = layer(&c, &device);
        let mut bn: BatchNorm = BatchNormConfig::new(c.cout).init(&device);
        let t = |seed: u64| Tensor::<1>::from_floats(values(c.cout, seed).as_slice(), &device);
        bn.gamma = Param::from_tensor(t(41).add_scalar(1.0));
        bn.beta = Param::from_tensor(t(42));
        bn.running_mean = RunningState::new(t(43));
        bn.running_var = RunningState::new(t(44).abs().add_scalar(0.5));
        let [h, w] = c.hw;
        let x = Tensor::<1>::from_floats(values(c.n * c.cin * h * w, 45).as_slice(), &device)
            .reshape([c.n, c.cin, h, w]);
        let y = conv.forward(x.clone());
        let r = Tensor::<1>::from_floats(values(y.dims().iter().product(), 46).as_slice(), &device)
            .reshape(y.dims());
        // The unit as the plan runs it on NCHW tensors: the batch norm folded in.
        let nchw = Plan::nchw(&x);
        assert!(matches!(nchw.path(&conv, &bn), Path::NchwFolded { .. }));
        let folded = |residual: Option<Tensor<4>>, relu: bool| {
            nchw.unit(&conv, &bn, x.clone(), residual, relu)
        };
        // The same unit on channels-last tensors, brought back to NCHW to compare: folded per
        // call (no cache), and packed once (through a cache, where the unit packs).
        let plan = Plan::new([(&conv, &bn)], &x);
        assert_eq!(plan.layout(), Layout::ChannelsLastInference);
        let cache = UnitCache::default();
        let packed = plan.with_cache(&cache);
        let channels_last = |plan: &Plan, residual: Option<Tensor<4>>, relu: bool| {
            let x = plan.enter(x.clone());
            to_channels_first(plan.unit(&conv, &bn, x, residual.map(to_channels_last), relu))
        };
        let forms = [
            ("shift", folded(None, false), bn.forward(y.clone())),
            (
                "channels-last shift",
                channels_last(&plan, None, false),
                bn.forward(y.clone()),
            ),
            (
                "channels-last relu",
                channels_last(&plan, None, true),
                relu(bn.forward(y.clone())),
            ),
            (
                "channels-last add relu",
                channels_last(&plan, Some(r.clone()), true),
                relu(bn.forward(y.clone()) + r.clone()),
            ),
            (
                "channels-last packed shift",
                channels_last(&packed, None, false),
                bn.forward(y.clone()),
            ),
            (
                "channels-last packed add relu",
                channels_last(&packed, Some(r.clone()), true),
                relu(bn.forward(y.clone()) + r.clone()),
            ),
            ("relu", folded(None, true), relu(bn.forward(y.clone()))),
            (
                "add relu",
                folded(Some(r.clone()), true),
                relu(bn.forward(y.clone()) + r),
            ),
        ];
        for (what, fused, reference) in forms {
            let label = format!("{what}: {}->{} k{} s{}", c.cin, c.cout, c.k, c.stride);
            assert_close(&label, &host(fused), &host(reference), 1e-5);
        }
    }
}

/// One unit on every device the plan knows, with the kernels on and off: the paths it picks.
#[test]
#[allow(deprecated)]
fn the_plan_picks_one_path_per_unit_and_the_switch_turns_the_kernels_off() {
    let flex = Device::flex();
    let ad = flex.clone().autodiff();
    let c = Case {
        n: 1,
        cin: 16,
        cout: 32,
        hw: [8, 8],
        k: 3,
        stride: 1,
        pad: 1,
        bias: false,
    };
    let unit = |device: &Device| {
        let conv = layer(&c, device);
        let bn: BatchNorm = BatchNormConfig::new(c.cout).init(device);
        let x = Tensor::<4>::zeros([1, c.cin, 8, 8], device);
        (conv, bn, x)
    };
    let (conv, bn, x) = unit(&flex);
    let plan = Plan::new([(&conv, &bn)], &x);
    assert_eq!(plan.layout(), Layout::ChannelsLastInference);
    assert!(matches!(
        plan.path(&conv, &bn),
        Path::ChannelsLastInference {
            padding: [1, 1],
            ..
        }
    ));
    assert_eq!(
        Plan::nchw(&x).path(&conv, &bn),
        Path::NchwFolded { padding: [1, 1] }
    );
    let (conv_ad, bn_ad, x_ad) = unit(&ad);
    assert_eq!(
        Plan::new([(&conv_ad, &bn_ad)], &x_ad).path(&conv_ad, &bn_ad),
        Path::ChannelsLastTraining { padding: [1, 1] }
    );
    // A frozen batch norm in a training graph: the convolution's kernel, burn's batch norm.
    let frozen = bn_ad.clone().valid().fork(&ad);
    assert_eq!(
        Plan::new([(&conv_ad, &frozen)], &x_ad).path(&conv_ad, &frozen),
        Path::Nchw {
            conv: ConvStep::Gemm { padding: [1, 1] },
            norm: NormStep::Burn
        }
    );
    let nd = Device::ndarray();
    let (conv_nd, bn_nd, x_nd) = unit(&nd);
    let plan = Plan::new([(&conv_nd, &bn_nd)], &x_nd);
    assert_eq!(plan.layout(), Layout::Nchw);
    assert_eq!(plan.path(&conv_nd, &bn_nd), Path::Burn);

    // Off: burn's operations everywhere, and the same values as burn's modules.
    {
        let _off = retina_kernels::scoped(false);
        assert!(!retina_kernels::enabled());
        for (conv, bn, x) in [(&conv, &bn, &x), (&conv_ad, &bn_ad, &x_ad)] {
            let plan = Plan::new([(conv, bn)], x);
            assert_eq!(plan.layout(), Layout::Nchw);
            assert_eq!(plan.path(conv, bn), Path::Burn);
            assert_eq!(conv_step(conv, x), ConvStep::Burn);
            assert_eq!(norm_step(bn, x), NormStep::Burn);
        }
        let x =
            Tensor::<1>::from_floats(values(16 * 64, 80).as_slice(), &flex).reshape([1, 16, 8, 8]);
        assert_eq!(
            host(Plan::nchw(&x).unit(&conv, &bn, x.clone(), None, true)),
            host(relu(bn.forward(conv.forward(x))))
        );
    }
    assert!(matches!(
        Plan::new([(&conv, &bn)], &x).path(&conv, &bn),
        Path::ChannelsLastInference { .. }
    ));
}
