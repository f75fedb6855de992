//! Choosing where the network runs: a CPU backend or the GPU through wgpu, at run time.
//!
//! Every backend is compiled into the binaries; the same weights load on each. The GPU is
//! probed up front, so that a machine without one gets a clear message (or, with `auto`, the
//! CPU) instead of a panic deep inside the GPU runtime.

use burn::prelude::*;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// What the user asked for with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The fastest CPU backend (flex).
    Cpu,
    /// burn-flex, the pure-Rust CPU backend.
    Flex,
    /// burn-ndarray, the older CPU backend (deprecated upstream, kept for comparison).
    Ndarray,
    /// The GPU through wgpu (Vulkan, Metal, DX12 or OpenGL).
    Wgpu,
    /// A hardware GPU if wgpu finds one, otherwise the CPU.
    #[default]
    Auto,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "flex" => Ok(Self::Flex),
            "ndarray" => Ok(Self::Ndarray),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown backend `{other}`: choose cpu, wgpu, auto, flex or ndarray"
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Auto => "auto",
        })
    }
}

/// The GPU could not be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "no usable GPU adapter for --backend wgpu: {0}\n\
     hint: install a Vulkan driver (on Debian, `apt-get install mesa-vulkan-drivers` gives a \
     software one), or run with --backend cpu"
)]
pub struct BackendError(pub String);

/// A device ready to run the network, and what it is.
#[derive(Debug, Clone)]
pub struct SelectedBackend {
    /// The device tensors go to.
    pub device: Device,
    /// Short backend name: `flex`, `ndarray` or `wgpu`.
    pub name: &'static str,
    /// What was chosen and why, for the user (adapter name, fallback reason).
    pub description: String,
}

/// The wgpu adapter found by the probe.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    device: Device,
    /// Adapter name, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub adapter: String,
    /// Graphics API, e.g. "Vulkan".
    pub api: String,
    /// Whether it is a software rasteriser running on the CPU.
    pub software: bool,
}

/// The discrete GPU this process takes, when several processes share a machine.
static GPU_INDEX: OnceLock<usize> = OnceLock::new();

/// Makes this process (rank `local_rank` of `local_size` on its machine, as under `mpirun`)
/// take discrete GPU `local_rank` (modulo the number of discrete GPUs) rather than the
/// default adapter, so 8 ranks on a machine with 8 GPUs take one each. With no discrete GPU
/// listed it changes nothing. Call before the first [`probe_gpu`].
pub fn use_gpu_of_local_rank(local_rank: usize, local_size: usize) {
    use burn::tensor::wgpu::wgpu;
    let discrete = listed_adapters().map_or(0, |list| {
        list.iter()
            .filter(|a| a.device_type == wgpu::DeviceType::DiscreteGpu)
            .count()
    });
    if discrete == 0 {
        return;
    }
    if local_size > discrete && local_rank == 0 {
        eprintln!(
            "warning: {local_size} ranks share this machine's {discrete} GPU(s); ranks take them \
             in turn"
        );
    }
    let _ = GPU_INDEX.set(local_rank % discrete);
}

/// The value of a future that completes on its first poll (native wgpu adapter listing).
fn pollster_ready<F: std::future::Future>(f: F) -> Option<F::Output> {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Probes wgpu once per process (the runtime can only be initialised once).
pub fn probe_gpu() -> Result<GpuInfo, BackendError> {
    static PROBE: OnceLock<Result<GpuInfo, BackendError>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let options = match GPU_INDEX.get() {
                Some(&i) => {
                    Device::wgpu_options().device_kind(burn::tensor::DeviceKind::DiscreteGpu(i))
                }
                None => Device::wgpu_options(),
            };
            // The runtime reports a missing adapter as an error, but older drivers have been seen
            // to panic inside it instead: treat both the same way.
            let result = std::panic::catch_unwind(|| options.init_with_setup());
            match result {
                Ok(Ok((device, setup))) => {
                    let info = setup.adapter.get_info();
                    Ok(GpuInfo {
                        device,
                        adapter: info.name.clone(),
                        api: format!("{:?}", info.backend),
                        software: info.device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu,
                    })
                }
                Ok(Err(e)) => Err(BackendError(e.to_string())),
                Err(panic) => Err(BackendError(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "the wgpu runtime panicked".into()),
                )),
            }
        })
        .clone()
}

/// Whether the primary graphics APIs (Vulkan, Metal, DX12) list a hardware adapter, asked
/// without starting the wgpu runtime: `None` when the answer is not immediate.
///
/// `auto` asks this first because starting the runtime also probes OpenGL, which on a machine
/// without a display prints `XDG_RUNTIME_DIR` errors on stderr and costs 0.1-0.2 s, all to find
/// nothing `auto` would use (a software rasteriser, or no adapter at all).
fn hardware_adapter_listed() -> Option<bool> {
    use burn::tensor::wgpu::wgpu;
    listed_adapters().map(|list| list.iter().any(|a| a.device_type != wgpu::DeviceType::Cpu))
}

/// The adapters the primary graphics APIs list, without starting the wgpu runtime; `None` when
/// the answer is not immediate or the driver panicked while listing (seen with old drivers: the
/// full probe then decides).
fn listed_adapters() -> Option<Vec<burn::tensor::wgpu::wgpu::AdapterInfo>> {
    use burn::tensor::wgpu::wgpu;
    std::panic::catch_unwind(|| {
        let backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        // Native adapter enumeration completes on the first poll.
        pollster_ready(instance.enumerate_adapters(backends))
            .map(|list| list.iter().map(|a| a.get_info()).collect())
    })
    .ok()
    .flatten()
}

/// Whether the kernel exposes any GPU device node. On Linux a hardware adapter needs one
/// (`/dev/dri/renderD*` for Mesa and AMD, `/dev/nvidia*`, `/dev/dxg` under WSL), so where there
/// is none `auto` can answer "CPU" without loading a Vulkan loader and its drivers, which alone
/// costs ~30 ms. Elsewhere the answer is "maybe", and the adapter listing decides.
fn gpu_device_nodes_present() -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    let has = |dir: &str, prefixes: &[&str]| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                prefixes.iter().any(|p| name.starts_with(p))
            })
        })
    };
    has("/dev/dri", &["renderD", "card"]) || has("/dev", &["nvidia", "dxg", "kfd"])
}

#[allow(deprecated)] // ndarray is deprecated upstream; we keep it selectable for comparison.
fn ndarray_device() -> Device {
    Device::ndarray()
}

impl BackendChoice {
    /// Resolves the choice to a device.
    ///
    /// `auto` takes the GPU only when it is real hardware: a software rasteriser (Mesa's
    /// llvmpipe or lavapipe) is much slower than the native CPU backend on the same cores.
    pub fn select(self) -> Result<SelectedBackend, BackendError> {
        let flex = |why: String| SelectedBackend {
            device: Device::flex(),
            name: "flex",
            description: format!("cpu (burn-flex){why}"),
        };
        match self {
            Self::Cpu | Self::Flex => Ok(flex(String::new())),
            Self::Ndarray => Ok(SelectedBackend {
                device: ndarray_device(),
                name: "ndarray",
                description: "cpu (burn-ndarray)".into(),
            }),
            Self::Wgpu => {
                let gpu = probe_gpu()?;
                Ok(SelectedBackend {
                    device: gpu.device.clone(),
                    name: "wgpu",
                    description: format!("wgpu ({}, {})", gpu.adapter, gpu.api),
                })
            }
            Self::Auto if !gpu_device_nodes_present() => {
                Ok(flex(" [auto: no GPU device in /dev]".into()))
            }
            Self::Auto if hardware_adapter_listed() == Some(false) => Ok(flex(
                " [auto: no hardware GPU adapter through Vulkan, Metal or DX12]".into(),
            )),
            Self::Auto => match probe_gpu() {
                Ok(gpu) if !gpu.software => Ok(SelectedBackend {
                    device: gpu.device.clone(),
                    name: "wgpu",
                    description: format!("wgpu ({}, {}) [auto]", gpu.adapter, gpu.api),
                }),
                Ok(gpu) => Ok(flex(format!(
                    " [auto: the only GPU adapter, {}, is a software rasteriser]",
                    gpu.adapter
                ))),
                Err(e) => Ok(flex(format!(" [auto: no GPU adapter: {}]", e.0))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` trusts the absence of GPU device nodes to mean "no hardware adapter": check that
    /// against the real adapter listing wherever the shortcut would be taken.
    #[test]
    fn no_device_nodes_means_no_hardware_adapter() {
        if !gpu_device_nodes_present() {
            assert_ne!(
                hardware_adapter_listed(),
                Some(true),
                "a hardware adapter is listed though /dev has no GPU node"
            );
        }
    }
}
