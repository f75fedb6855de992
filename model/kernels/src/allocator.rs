//! Keeping freed tensor buffers in the process instead of handing them back to the kernel.
//!
//! A CPU training step allocates and frees hundreds of tensors of one to tens of MB. glibc's
//! malloc serves blocks that large with fresh `mmap`s and unmaps them on free, so every step
//! paid for page faults, zeroing of new pages and TLB shoot-downs across the threads (about 5% of
//! a profile). Raising the mmap and trim thresholds makes those blocks come from, and go back
//! to, the heap. Measured on the reference network at 128 px, batch 16: 22.4 to 26.5 training
//! images/s, peak RSS unchanged (195 vs 184 MiB). PyTorch keeps a caching allocator for the same
//! reason.

/// Applies the thresholds; call once at the start of `main`, before other threads exist. Does
/// nothing where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before any other thread
        // allocates. The return value (1 on success) is ignored: a refusal only costs speed.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
