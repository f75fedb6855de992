//! What Retina asks of the host: files written atomically, directories swapped in whole, and
//! the process's peak memory for the benchmarks. One implementation each, shared by training,
//! inference and the bundles, so a model, a checkpoint and a log are written the same way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// A scratch name beside `path`, unique to this process and call: `.NAME.TAG-PID-N`.
fn scratch_beside(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
    parent_or_dot(path).join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

fn parent_or_dot(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn with_path(path: &Path, what: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically: a scratch file in the same folder (created with the
/// usual 0644 permissions: models, logs and data sets are meant to be read by others), synced,
/// then renamed over the target. A crash leaves the old file or the new one, never half of
/// either. Creates the parent folder. Errors name the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_or_dot(path);
    std::fs::create_dir_all(&dir).map_err(|e| with_path(&dir, "create", e))?;
    let tmp = scratch_beside(path, "tmp");
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o644);
        }
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        with_path(path, "write", e)
    })
}

/// Replaces the directory `dir` whole: `fill` writes the new contents into a scratch directory
/// beside it, which is then swapped in by renames. Until the swap the old directory stays as
/// it was; if `fill` fails, the scratch is removed and `dir` is untouched.
pub fn replace_dir<E: From<std::io::Error>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = parent_or_dot(dir);
    std::fs::create_dir_all(&parent).map_err(|e| with_path(&parent, "create", e))?;
    let scratch = scratch_beside(dir, "partial");
    std::fs::create_dir(&scratch).map_err(|e| with_path(&scratch, "create", e))?;
    let result = fill(&scratch).and_then(|()| {
        if dir.exists() {
            let old = scratch_beside(dir, "old");
            std::fs::rename(dir, &old).map_err(|e| with_path(dir, "move aside", e))?;
            std::fs::rename(&scratch, dir).map_err(|e| with_path(dir, "replace", e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&scratch, dir).map_err(|e| with_path(dir, "create", e))?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

/// The process's peak resident memory in MiB (`VmHWM`), where the OS reports it (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("retina-host-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_replaces_and_is_readable_by_others() {
        let d = temp_dir("write");
        let f = d.join("sub/a.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o044, 0o044, "group/others can read: {mode:o}");
        }
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(d.join("sub")).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_fill_leaves_the_old_directory_untouched() {
        let d = temp_dir("swap");
        let target = d.join("model");
        replace_dir::<std::io::Error>(&target, |s| std::fs::write(s.join("w"), b"v1")).unwrap();
        let failed = replace_dir::<std::io::Error>(&target, |s| {
            std::fs::write(s.join("w"), b"v2")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(target.join("w")).unwrap(), b"v1");
        replace_dir::<std::io::Error>(&target, |s| std::fs::write(s.join("w"), b"v3")).unwrap();
        assert_eq!(std::fs::read(target.join("w")).unwrap(), b"v3");
        // Only the target remains: no scratch or old copies.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
