//! The trunk's kernel paths against its NCHW path and burn's modules: channels-last inference
//! against NCHW, the cache of packed kernels, a trunk mixing packed and `gemm` units. The
//! kernels' own tests (one layer at a time) are retina-kernels' (`model/kernels/tests`).

use retina_kernels::{Kernel, Layout, Path};
use retina_model::burn::module::Param;
use retina_model::burn::prelude::*;

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

/// Whether the trunk's stem runs from a packed kernel (direct or Winograd) on `size`-pixel
/// inputs: not on a CPU without AVX2 and FMA.
fn packs(trunk: &retina_model::trunk::Trunk, size: usize) -> bool {
    let x = Tensor::<4>::zeros([1, 3, size, size], &Device::flex());
    matches!(
        trunk.plan(&x).path(&trunk.stem.conv, &trunk.stem.bn),
        Path::ChannelsLastInference {
            kernel: Kernel::Direct | Kernel::Winograd,
            ..
        }
    )
}

/// The trunk's channels-last inference (`forward_pooled`) against its NCHW path
/// (`forward_stages`, then pooling), at batches of 1 and 3 `size`-pixel inputs from `seed`.
fn assert_trunk_matches_nchw(trunk: &retina_model::trunk::Trunk, size: usize, seed: u64) {
    use retina_model::trunk::global_avg_pool;
    let device = Device::flex();
    let stages = trunk.stages.len();
    for n in [1, 3] {
        let x = Tensor::<1>::from_floats(
            values(n * 3 * size * size, seed + n as u64).as_slice(),
            &device,
        )
        .reshape([n, 3, size, size]);
        assert_eq!(trunk.plan(&x).layout(), Layout::ChannelsLastInference);
        let fast = trunk.forward_pooled(x.clone(), stages);
        let nchw: Vec<_> = trunk
            .forward_stages(x, stages)
            .into_iter()
            .map(global_avg_pool)
            .collect();
        assert_eq!(fast.len(), nchw.len());
        for (k, (a, b)) in fast.into_iter().zip(nchw).enumerate() {
            assert_eq!(a.dims(), b.dims(), "stage {}", k + 1);
            assert_close(
                &format!("batch {n}, stage {}", k + 1),
                &host(a),
                &host(b),
                1e-4,
            );
        }
    }
}

#[test]
fn channels_last_trunk_matches_the_nchw_trunk() {
    use retina_model::RetinaConfig;
    let device = Device::flex();
    device.seed(3);
    let mut config = RetinaConfig::preset("reference").unwrap();
    config.preprocess.image_size = 40;
    let net = config.init(&device).unwrap();
    // Away from the initial running statistics, so the folded batch norms matter.
    let net = {
        use retina_model::burn::module::RunningState;
        let mut net = net;
        for block in net
            .trunk
            .stages
            .iter_mut()
            .flat_map(|s| s.blocks.iter_mut())
        {
            let c = block.bn2.gamma.dims()[0];
            let t = |seed: u64| Tensor::<1>::from_floats(values(c, seed).as_slice(), &device);
            block.bn2.running_mean = RunningState::new(t(51).mul_scalar(0.3));
            block.bn2.running_var = RunningState::new(t(52).abs().add_scalar(0.5));
            block.bn2.beta = Param::from_tensor(t(53));
        }
        net
    };
    let ad = Tensor::<4>::zeros([1, 3, 40, 40], &device.clone().autodiff());
    assert_ne!(
        net.trunk.plan(&ad).layout(),
        Layout::ChannelsLastInference,
        "autodiff is never inference"
    );
    assert_trunk_matches_nchw(&net.trunk, 40, 50);
}

#[test]
fn inference_reuses_its_folded_kernels_until_a_weight_changes() {
    use retina_model::RetinaConfig;
    use retina_model::trunk::global_avg_pool;
    let device = Device::flex();
    device.seed(4);
    let mut config = RetinaConfig::preset("reference").unwrap();
    config.preprocess.image_size = 40;
    let mut net = config.init(&device).unwrap();
    if !packs(&net.trunk, 40) {
        eprintln!("no AVX2/FMA: the packed path (and its cache) is not used on this CPU");
        return;
    }
    let stages = net.trunk.stages.len();
    let x = Tensor::<1>::from_floats(values(3 * 40 * 40, 60).as_slice(), &device)
        .reshape([1, 3, 40, 40]);
    let pooled = |net: &retina_model::RetinaNet| -> Vec<Vec<f32>> {
        net.trunk
            .forward_pooled(x.clone(), stages)
            .into_iter()
            .map(host)
            .collect()
    };
    let reference = |net: &retina_model::RetinaNet| -> Vec<Vec<f32>> {
        net.trunk
            .forward_stages(x.clone(), stages)
            .into_iter()
            .map(|t| host(global_avg_pool(t)))
            .collect()
    };
    // The stem, two convolutions a block and the projection shortcuts.
    let units = 1 + net
        .trunk
        .stages
        .iter()
        .flat_map(|s| &s.blocks)
        .map(|b| 2 + usize::from(b.downsample.is_some()))
        .sum::<usize>();
    let first = pooled(&net);
    assert_eq!(net.trunk.inference_cache().folds(), units);
    assert_eq!(net.trunk.inference_cache().len(), units);
    // Again, and through a clone (which shares the cache): nothing is folded again.
    assert_eq!(pooled(&net), first);
    assert_eq!(pooled(&net.clone()), first);
    assert_eq!(net.trunk.inference_cache().folds(), units);

    // A changed weight (same parameter id, new values) and a changed batch-norm scale: those two
    // units are folded again, and the outputs follow the new values.
    let block = &mut net.trunk.stages[1].blocks[0];
    block.conv2.weight = block.conv2.weight.clone().map(|w| w.mul_scalar(-1.5));
    block.bn1.gamma = block.bn1.gamma.clone().map(|g| g.mul_scalar(0.5));
    let second = pooled(&net);
    assert_eq!(net.trunk.inference_cache().folds(), units + 2);
    assert_eq!(net.trunk.inference_cache().len(), units);
    assert_ne!(second, first);
    for (k, (a, b)) in second.iter().zip(reference(&net)).enumerate() {
        assert_close(&format!("after the change, stage {}", k + 1), a, &b, 1e-4);
    }
}

#[test]
fn a_trunk_mixing_packed_and_gemm_units_matches_the_nchw_trunk() {
    use retina_model::{RetinaConfig, StageConfig, TrunkConfig};
    let device = Device::flex();
    device.seed(5);
    let mut config = RetinaConfig::preset("small").unwrap();
    // 24 output channels are not a whole number of 16-channel blocks: those units run through
    // the `gemm` kernels, the others through the packed (direct, Winograd) ones.
    config.trunk = TrunkConfig::new(
        16,
        vec![
            StageConfig::new(24).with_stride(1),
            StageConfig::new(32).with_stride(2),
            StageConfig::new(48).with_stride(2),
        ],
    );
    config.preprocess.image_size = 36;
    let net = config.init(&device).unwrap();
    assert_trunk_matches_nchw(&net.trunk, 36, 70);
    if packs(&net.trunk, 36) {
        // The stem (16) and stages 2 and 3 (two convolutions and a shortcut each) are packed;
        // stage 1 (24 channels) is not.
        assert_eq!(net.trunk.inference_cache().len(), 7);
    }
}
