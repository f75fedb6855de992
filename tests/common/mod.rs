//! Helpers shared by the end-to-end tests: the workspace's binaries, run and read.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of a workspace binary, built on first use with the profile of this test binary.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/<profile>
    BUILT.get_or_init(|| {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut c = Command::new(env!("CARGO"));
        // The whole workspace, so features unify exactly as in `cargo test --workspace` (no rebuild).
        c.args(["build", "--quiet", "--workspace", "--bins"]);
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("cargo runs");
        assert!(st.success(), "building the binaries failed");
    });
    profile_dir.join(name)
}

pub fn run(name: &str, args: &[&str]) -> Output {
    run_in(Path::new("."), name, args)
}

/// [`run`] with `dir` as the working directory.
pub fn run_in(dir: &Path, name: &str, args: &[&str]) -> Output {
    let out = Command::new(bin(name))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    eprintln!(
        "$ {name} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn synth(dir: &Path, count: usize) -> PathBuf {
    let out = run(
        "retina-train",
        &[
            "synth",
            "--out",
            dir.to_str().unwrap(),
            "--count",
            &count.to_string(),
            "--size",
            // The embedded model's quality head refuses most pictures this small, blown up to
            // its 128 px input, as overexposed; 192 px is answered.
            "192",
            "--seed",
            "4",
            "--grades",
            "1,1,1,1,1",
        ],
    );
    assert!(out.status.success());
    dir.join("images")
}

pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn field<'a>(v: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    path.split('.').fold(v, |v, k| &v[k])
}
