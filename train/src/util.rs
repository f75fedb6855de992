//! Small helpers shared by the commands.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then
/// renamed over the target. A crash leaves either the old file or the new one, never half.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    // Temporary files are created owner-only (0600); data sets and models are meant to be read
    // by others, so give the result the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    }
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Parses `a,b,c,d,e` into five non-negative weights.
pub fn parse_grade_mix(s: &str) -> Result<[f32; 5], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 5 {
        return Err(format!(
            "expected five comma-separated weights for grades 0-4, found {}",
            parts.len()
        ));
    }
    let mut out = [0f32; 5];
    for (i, p) in parts.iter().enumerate() {
        out[i] = p
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("weight {} (`{p}`) is not a non-negative number", i + 1))?;
    }
    if out.iter().sum::<f32>() <= 0.0 {
        return Err("the weights must not all be zero".into());
    }
    Ok(out)
}
