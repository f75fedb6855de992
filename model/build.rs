//! Records the git revision the binaries are built from (`retina_model::GIT_REVISION`), for
//! the provenance of the models they train and the build info they report: the directory a
//! program is started in may be another repository, or none.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    if let Some(rev) = git(&["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=RETINA_GIT_REVISION={rev}");
    }
    // Rebuild when HEAD moves (a commit, a checkout); a worktree keeps its HEAD apart from the
    // shared refs.
    for dir in [
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ]
    .into_iter()
    .flatten()
    {
        for f in ["HEAD", "packed-refs", "refs/heads"] {
            // A path that does not exist would rerun this script on every build.
            let path = std::path::Path::new(&dir).join(f);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
