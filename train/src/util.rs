//! Small helpers shared by the commands.

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

/// Prints `e` and its causes on stderr, as the binary ends with them.
pub fn report_error(e: &anyhow::Error) {
    eprintln!("error: {e}");
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}
