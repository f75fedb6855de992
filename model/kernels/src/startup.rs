//! Process settings a binary makes first thing in `main`, before any thread exists.

/// Turns off Mesa's Vulkan `device_select` layer for this process (unless the user set
/// `NODEVICE_SELECT` themselves). The layer ranks GPUs by connecting to the display server; on a
/// machine without one (a server, CI) that connection prints `XDG_RUNTIME_DIR is invalid` on
/// stderr every time wgpu lists adapters, which `--backend auto` does at start. wgpu ranks the
/// adapters itself, so nothing is lost.
///
/// Call once at the start of `main`, before other threads exist.
pub fn quiet_vulkan_layers() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: called first in `main`, before any other thread exists, so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}
