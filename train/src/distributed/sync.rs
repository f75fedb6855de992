//! Moving a model's numbers through a [`Collective`]: a step's gradients in one flat buffer,
//! the batch-norm running statistics, and the whole model (the initial broadcast and the check
//! that every rank still holds the same weights).
//!
//! Every walk goes through the module in burn's visiting order, which is the same on every rank
//! for the same config: the flat layout needs no names or ids exchanged. Parameter ids differ
//! between ranks (each rank built its own model) and never leave the process.

use super::Collective;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use retina_model::RetinaNet;

/// Whether a float tensor the visitor meets is a trainable parameter rather than a buffer
/// (batch norm's running mean and variance are visited as parameters that require no gradient).
fn trainable<const D: usize>(param: &Param<Tensor<D>>) -> bool {
    param.val().is_require_grad()
}

/// A step's gradients and the host numbers that travel with them (`extra`), summed over the
/// ranks in one all-reduce of `[gradients of every trainable parameter (zeros where a rank has
/// none), one presence count per parameter, extra...]`; returns the summed gradients and the
/// bytes each rank sent.
///
/// Sums `grads` and `extra` over the ranks. A parameter gets a gradient back when at least
/// one rank had one (the others count as zero), so the optimizer treats a parameter no rank
/// touched (the quality head in a step without quality examples) as a single process would.
/// `device` is the device gradients live on (the backend under autodiff).
pub fn all_reduce_step(
    group: &dyn Collective,
    model: &RetinaNet,
    grads: GradientsParams,
    extra: &mut [f32],
    device: &Device,
) -> (GradientsParams, usize) {
    // Pack: the present gradients concatenated on the device, one read to the host.
    struct Pack {
        grads: GradientsParams,
        shapes: Vec<Vec<usize>>,
        present: Vec<f32>,
        tensors: Vec<Tensor<1>>,
        offsets: Vec<usize>,
        len: usize,
    }
    impl ModuleVisitor for Pack {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !trainable(param) {
                return;
            }
            let dims = param.val().dims().to_vec();
            let numel: usize = dims.iter().product();
            match self.grads.remove::<D>(param.id) {
                Some(g) => {
                    self.tensors.push(g.reshape([numel]));
                    self.offsets.push(self.len);
                    self.present.push(1.0);
                }
                None => self.present.push(0.0),
            }
            self.shapes.push(dims);
            self.len += numel;
        }
    }
    let mut pack = Pack {
        grads,
        shapes: Vec::new(),
        present: Vec::new(),
        tensors: Vec::new(),
        offsets: Vec::new(),
        len: 0,
    };
    model.visit(&mut pack);
    let Pack {
        shapes,
        present,
        tensors,
        offsets,
        len,
        ..
    } = pack;
    let mut buf = vec![0f32; len + present.len() + extra.len()];
    if !tensors.is_empty() {
        let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).collect();
        let host = Tensor::cat(tensors, 0)
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 gradients");
        let mut at = 0;
        for (off, n) in offsets.iter().zip(sizes) {
            buf[*off..off + n].copy_from_slice(&host[at..at + n]);
            at += n;
        }
    }
    buf[len..len + present.len()].copy_from_slice(&present);
    buf[len + present.len()..].copy_from_slice(extra);

    group.all_reduce_sum(&mut buf);

    extra.copy_from_slice(&buf[len + shapes.len()..]);
    let counts = buf[len..len + shapes.len()].to_vec();
    buf.truncate(len);
    // Unpack: one upload, sliced per parameter on the device.
    struct Unpack {
        flat: Tensor<1>,
        shapes: std::vec::IntoIter<Vec<usize>>,
        counts: std::vec::IntoIter<f32>,
        at: usize,
        out: GradientsParams,
    }
    impl ModuleVisitor for Unpack {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !trainable(param) {
                return;
            }
            let dims = self.shapes.next().expect("the same parameters");
            let numel: usize = dims.iter().product();
            let count = self.counts.next().expect("one count per parameter");
            if count > 0.0 {
                let shape: [usize; D] = dims.try_into().expect("the parameter's rank");
                let g = self
                    .flat
                    .clone()
                    .slice(self.at..self.at + numel)
                    .reshape(shape);
                self.out.register(param.id, g);
            }
            self.at += numel;
        }
    }
    let bytes = (len + shapes.len() + extra.len()) * 4;
    let mut unpack = Unpack {
        flat: Tensor::from_data(TensorData::new(buf, [len]), device),
        shapes: shapes.into_iter(),
        counts: counts.into_iter(),
        at: 0,
        out: GradientsParams::new(),
    };
    model.visit(&mut unpack);
    (unpack.out, bytes)
}

/// Every float tensor of `model` that `keep` selects, flattened in visiting order into one host
/// vector (one read per tensor: used once an epoch, not per step).
fn flatten(model: &RetinaNet, keep: fn(bool) -> bool) -> Vec<f32> {
    settle_running_statistics(model);
    struct Flat {
        keep: fn(bool) -> bool,
        out: Vec<f32>,
    }
    impl ModuleVisitor for Flat {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if (self.keep)(trainable(param)) {
                let v = param
                    .val()
                    .into_data()
                    .try_into_vec::<f32>()
                    .expect("f32 weights");
                self.out.extend(v);
            }
        }
    }
    let mut flat = Flat {
        keep,
        out: Vec::new(),
    };
    model.visit(&mut flat);
    flat.out
}

/// `model` with the float tensors `keep` selects replaced, in visiting order, by `values`.
fn unflatten(model: RetinaNet, keep: fn(bool) -> bool, values: &[f32]) -> RetinaNet {
    settle_running_statistics(&model);
    struct Set<'a> {
        keep: fn(bool) -> bool,
        values: &'a [f32],
        at: usize,
    }
    impl ModuleMapper for Set<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !(self.keep)(trainable(&param)) {
                return param;
            }
            let at = self.at;
            let values = self.values;
            let mut numel = 0;
            let param = param.map(|old| {
                let shape = old.shape();
                numel = shape.num_elements();
                let grad = old.is_require_grad();
                Tensor::from_data(
                    TensorData::new(values[at..at + numel].to_vec(), shape),
                    &old.device(),
                )
                .set_require_grad(grad)
            });
            self.at += numel;
            param
        }
    }
    let mut set = Set {
        keep,
        values,
        at: 0,
    };
    let model = model.map(&mut set);
    assert_eq!(set.at, values.len(), "the same layout on every rank");
    model
}

/// Applies the running-statistic updates burn keeps pending. A `RunningState` holds the last
/// forward pass's update aside (per thread) until it is next read with `value_sync`, so a
/// visitor sees the value one update behind, and a value set by a mapper is overwritten by the
/// pending update at the next sync. `valid()` syncs every running state of the module in
/// place (they are shared); the snapshot it returns is not needed.
fn settle_running_statistics(model: &RetinaNet) {
    let _ = model.valid();
}

const ALL: fn(bool) -> bool = |_| true;
const BUFFERS: fn(bool) -> bool = |trainable| !trainable;

/// Rank 0's weights and running statistics, on every rank: the ranks start identical.
pub fn broadcast_model(group: &dyn Collective, model: RetinaNet) -> RetinaNet {
    if group.size() == 1 {
        return model;
    }
    let mine = if group.is_root() {
        to_bytes(&flatten(&model, ALL))
    } else {
        Vec::new()
    };
    let values = from_bytes(&group.broadcast(mine));
    unflatten(model, ALL, &values)
}

/// Batch norm's running statistics (means and variances), flattened in visiting order.
pub fn running_statistics(model: &RetinaNet) -> Vec<f32> {
    flatten(model, BUFFERS)
}

/// `model` with its running statistics replaced by `values` (as [`running_statistics`] lays
/// them out).
pub fn set_running_statistics(model: RetinaNet, values: &[f32]) -> RetinaNet {
    unflatten(model, BUFFERS, values)
}

/// Batch norm's running statistics averaged over the ranks (each rank's came from its own
/// shard of the data): what validation and the exported model use. The update is linear, so
/// averaging once an epoch equals averaging every step.
pub fn average_running_statistics(group: &dyn Collective, model: RetinaNet) -> RetinaNet {
    if group.size() == 1 {
        return model;
    }
    let mut stats = running_statistics(&model);
    group.all_reduce_sum(&mut stats);
    let k = group.size() as f32;
    stats.iter_mut().for_each(|v| *v /= k);
    set_running_statistics(model, &stats)
}

/// A hash of every weight and running statistic, to show the ranks hold the same model.
pub fn weight_hash(model: &RetinaNet) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&to_bytes(&flatten(model, ALL)))
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Every rank's hash of its model, in rank order; an error (on every rank alike) when they
/// differ, which would mean the ranks no longer train one model. With one rank there is
/// nothing to compare and nothing is read (empty).
pub fn check_identical(group: &dyn Collective, model: &RetinaNet) -> anyhow::Result<Vec<u64>> {
    if group.size() == 1 {
        return Ok(Vec::new());
    }
    let hashes: Vec<u64> = group
        .all_gather(&weight_hash(model).to_le_bytes())
        .iter()
        .map(|b| u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
        .collect();
    if hashes.iter().any(|h| *h != hashes[0]) {
        anyhow::bail!(
            "the ranks no longer hold the same weights (hashes {}): their gradient all-reduce \
             went wrong; the last checkpoint is rank 0's",
            hashes
                .iter()
                .map(|h| format!("{h:016x}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(hashes)
}
