//! # retina-kernels
//!
//! Retina's CPU kernels, registered as burn backend extensions for Flex and `Autodiff<Flex>`:
//! the im2col / shifted-window `gemm` convolution with its own backward ([`conv`]), the fused
//! batch norms ([`norm`]), the channels-last convolutions with the direct and Winograd kernels
//! ([`conv::channels_last`]), the cache of inference's folded and packed kernels
//! ([`UnitCache`]) and the allocator thresholds ([`allocator`]). All of Retina's `unsafe` code
//! is here.
//!
//! Which kernel runs a convolution + batch-norm unit is decided in one place, the [`plan`]: the
//! network asks it once per pass ([`Plan::new`]) and runs every unit through [`Plan::unit`].
//! Everywhere the kernels do not apply (wgpu, NdArray, other dtypes) the units run on burn's own
//! `Conv2d`, `BatchNorm` and ReLU, as they do everywhere when the kernels are switched off
//! ([`enabled`]: the `RETINA_KERNELS` environment variable, [`set_enabled`], [`scoped`]).
//!
//! ```no_run
//! use burn::nn::conv::Conv2dConfig;
//! use burn::nn::BatchNormConfig;
//! use burn::prelude::*;
//! use retina_kernels::{Layout, Plan};
//!
//! let device = Device::flex();
//! let conv = Conv2dConfig::new([3, 16], [3, 3]).init(&device);
//! let bn = BatchNormConfig::new(16).init(&device);
//! let x = Tensor::<4>::zeros([1, 3, 32, 32], &device);
//! let plan = Plan::new([(&conv, &bn)], &x);
//! assert_eq!(plan.layout(), Layout::ChannelsLastInference);
//! let y = plan.unit(&conv, &bn, plan.enter(x), None, true);
//! let pooled = plan.pool(y); // [1, 16]
//! ```

pub mod allocator;
pub mod conv;
pub mod isa;
pub mod norm;
pub mod plan;
pub mod startup;
mod switch;
mod unit_cache;

pub use conv::conv2d;
pub use isa::{ISA_ENV, Isa, IsaScope, active_isa, cpu_model, scoped_isa};
pub use norm::{batch_norm, batch_norm_add_relu, batch_norm_relu};
pub use plan::{ConvStep, Kernel, Layout, NormStep, Path, Plan};
pub use switch::{ENV, Scoped, enabled, scoped, set_enabled};
pub use unit_cache::UnitCache;
