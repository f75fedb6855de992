//! The trunk's convolution + batch-norm units as inference runs them, kept between calls.
//!
//! Why: an inference pass on the CPU folds every batch norm into its convolution's weights and
//! reorders the kernel for the direct convolution (1.2M weights in the reference network): about
//! 1.9 ms of a 17 ms batch-1 pass at 224 px, measured, redone on every call although the weights
//! do not change between requests. The trunk keeps each unit's packed kernel and shift and
//! reuses them for as long as the unit's tensors are the ones they were made from.
//!
//! Staleness is ruled out by identity, not by a version number: an entry holds the very tensors
//! (weight, bias, the batch norm's four) that it was made from and is used only while the module
//! still holds the same buffers with the same layout. Because the entry shares those buffers,
//! nobody can change them in place (Flex writes in place only into unshared buffers) or free and
//! reuse their memory; an optimizer step or a loaded checkpoint brings new buffers, and the next
//! call re-folds that unit.

use crate::conv::channels_last::{self, PackedKernel};
use crate::norm::folded_scale_shift;
use burn::backend::DType;
use burn::module::ParamId;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Per-unit packed kernels of one trunk, shared by its clones (keyed by the convolution
/// weight's parameter id).
#[derive(Clone, Default)]
pub struct UnitCache {
    units: Arc<Mutex<HashMap<ParamId, Arc<Folded>>>>,
    folds: Arc<AtomicUsize>,
}

impl std::fmt::Debug for UnitCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UnitCache({} units)", self.len())
    }
}

/// One unit folded and packed, with the tensors it came from.
struct Folded {
    sources: Vec<Tensor<1>>,
    weight: Tensor<4>,
    /// Which form depends on the padding too, which the same weights could run with another.
    padding: [usize; 2],
    kernel: PackedKernel,
    shift: Tensor<1>,
}

impl UnitCache {
    /// `relu?(bn(conv(x)) (+ residual))` in inference on a channels-last `x`, from this unit's
    /// packed kernel (made now if the cache has none for the unit's current tensors): the plan's
    /// [`crate::Path::ChannelsLastInference`] with the direct or the Winograd kernel, which
    /// checked that the unit packs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_bn(
        &self,
        conv: &Conv2d,
        bn: &BatchNorm,
        x: Tensor<4>,
        residual: Option<Tensor<4>>,
        relu: bool,
        padding: [usize; 2],
        winograd: bool,
    ) -> Tensor<4> {
        let folded = self.folded(conv, bn, padding, winograd, &x.device());
        channels_last::conv2d_packed(
            x,
            &folded.kernel,
            folded.shift.clone(),
            residual,
            conv.stride,
            padding,
            relu,
        )
    }

    /// Number of units held.
    pub fn len(&self) -> usize {
        self.units.lock().map_or(0, |m| m.len())
    }

    /// How many times a unit was folded and packed since the trunk was built: once per unit
    /// while its weights stay the same.
    pub fn folds(&self) -> usize {
        self.folds.load(Ordering::Relaxed)
    }

    /// Whether no unit is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn folded(
        &self,
        conv: &Conv2d,
        bn: &BatchNorm,
        padding: [usize; 2],
        winograd: bool,
        device: &Device,
    ) -> Arc<Folded> {
        let weight = conv.weight.val();
        let sources = sources(conv, bn);
        let key = conv.weight.id;
        // A poisoned lock only means another thread panicked while inserting: the map itself is
        // still a valid cache.
        let lookup = |map: &HashMap<ParamId, Arc<Folded>>| {
            map.get(&key)
                .filter(|f| {
                    f.padding == padding
                        && f.kernel.winograd == winograd
                        && same(&f.weight, &weight)
                        && f.sources.len() == sources.len()
                        && f.sources.iter().zip(&sources).all(|(a, b)| same(a, b))
                })
                .cloned()
        };
        if let Some(hit) = lookup(&self.units.lock().unwrap_or_else(|e| e.into_inner())) {
            return hit;
        }
        // Fold outside the lock: two threads may both fold a unit once; the last insert wins.
        let (scale, shift) = folded_scale_shift(conv, bn, device);
        let kernel = channels_last::pack_kernel(weight.clone(), scale, winograd);
        let folded = Arc::new(Folded {
            sources,
            weight,
            padding,
            kernel,
            shift,
        });
        self.folds.fetch_add(1, Ordering::Relaxed);
        self.units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, folded.clone());
        folded
    }
}

/// The 1-D tensors a unit's fold reads besides the weight.
fn sources(conv: &Conv2d, bn: &BatchNorm) -> Vec<Tensor<1>> {
    let mut out = vec![
        bn.gamma.val(),
        bn.beta.val(),
        bn.running_mean.value(),
        bn.running_var.value(),
    ];
    out.extend(conv.bias.as_ref().map(|b| b.val()));
    out
}

/// Whether two tensors are the same f32 Flex buffer viewed the same way.
fn same<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> bool {
    use burn::backend::{BackendTensor, DispatchTensorKind};
    let flex = |t: &Tensor<D>| match t.clone().into_dispatch().kind {
        DispatchTensorKind::Flex(BackendTensor::Float(t)) if t.dtype() == DType::F32 => Some(t),
        _ => None,
    };
    match (flex(a), flex(b)) {
        (Some(a), Some(b)) => {
            std::ptr::eq(a.storage::<f32>(), b.storage::<f32>()) && a.layout() == b.layout()
        }
        _ => false,
    }
}
