//! Which instruction set the convolution kernels use: AVX-512, AVX2 + FMA, or the portable path
//! (the `gemm` convolution, whose matrix kernels pick their own instructions at run time).
//!
//! Chosen once per process from what the CPU reports (`is_x86_feature_detected!`), overridable
//! with `RETINA_ISA=avx512|avx2|portable` (capped at what the CPU has), and per thread with
//! [`scoped_isa`], so the tests run every path the machine supports: the AVX2 kernels are tested
//! on an AVX-512 machine too. The choice is read on the thread that starts a convolution and
//! carried to the worker threads with the work.

use std::cell::Cell;
use std::sync::OnceLock;

/// The environment variable that overrides the instruction set.
pub const ISA_ENV: &str = "RETINA_ISA";

/// A kernel instruction set, from the most portable up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// No hand-written SIMD: the `gemm` convolution (also what non-x86 CPUs run).
    Portable,
    /// AVX2 and FMA (x86-64 since Haswell and Zen 1): 8 floats a register.
    Avx2,
    /// AVX-512 F and FMA (Skylake-SP and later Xeons, Zen 4): 16 floats a register.
    Avx512,
}

impl Isa {
    /// Its name in `RETINA_ISA`, benchmarks and logs.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "none" | "scalar" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx-512" | "avx512f" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// The best instruction set this CPU runs.
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// Every instruction set this CPU runs, portable first.
    pub fn supported() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| *i <= Isa::detected())
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    let fma = std::is_x86_feature_detected!("fma");
    if fma && std::is_x86_feature_detected!("avx512f") {
        Isa::Avx512
    } else if fma && std::is_x86_feature_detected!("avx2") {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

thread_local! {
    static THREAD: Cell<Option<Isa>> = const { Cell::new(None) };
}

/// The instruction set convolutions started on this thread use.
pub fn active_isa() -> Isa {
    static PROCESS: OnceLock<Isa> = OnceLock::new();
    THREAD
        .with(Cell::get)
        .unwrap_or_else(|| *PROCESS.get_or_init(from_env))
}

fn from_env() -> Isa {
    let best = Isa::detected();
    let Ok(v) = std::env::var(ISA_ENV) else {
        return best;
    };
    if v.trim().is_empty() || v.trim().eq_ignore_ascii_case("auto") {
        return best;
    }
    match Isa::parse(&v) {
        Some(asked) if asked <= best => asked,
        Some(asked) => {
            eprintln!(
                "warning: {ISA_ENV}={v:?}: this CPU has no {} ; using {}",
                asked.name(),
                best.name()
            );
            best
        }
        None => {
            eprintln!(
                "warning: {ISA_ENV}={v:?} is not an instruction set: use avx512, avx2, portable \
                 or auto; using {}",
                best.name()
            );
            best
        }
    }
}

/// Runs this thread's convolutions with `isa` until the guard drops; `None` when the CPU does
/// not have it.
pub fn scoped_isa(isa: Isa) -> Option<IsaScope> {
    (isa <= Isa::detected()).then(|| IsaScope {
        previous: THREAD.with(|t| t.replace(Some(isa))),
        _not_send: std::marker::PhantomData,
    })
}

/// Restores the thread's instruction set when dropped.
#[must_use = "the setting ends when the guard drops"]
#[derive(Debug)]
pub struct IsaScope {
    previous: Option<Isa>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for IsaScope {
    fn drop(&mut self) {
        THREAD.with(|t| t.set(self.previous));
    }
}

/// The CPU's model name (`/proc/cpuinfo` on Linux), for benchmark reports.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| format!("unknown {} CPU", std::env::consts::ARCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_scopes_nest() {
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("sse9"), None);
        let outer = active_isa();
        {
            let _p = scoped_isa(Isa::Portable).expect("every CPU runs the portable path");
            assert_eq!(active_isa(), Isa::Portable);
        }
        assert_eq!(active_isa(), outer);
        assert_eq!(Isa::supported().last(), Some(&Isa::detected()));
    }
}
