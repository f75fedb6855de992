//! Data-parallel training on MPI: `mpirun -np 2` on this machine (built with `--features
//! retina-train/mpi`; `.ci/run` installs Open MPI and runs these).
#![cfg(feature = "mpi")]

mod common;

use common::{exported_weights, logs};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_retina-train");

/// A small run: 96 generated eyes at 32 px, batch 8, quality teaching off (its frozen batch-norm
/// pass reads each rank's own running statistics, which only meet at the end of the epoch, so
/// it is the one part of a step that one process cannot repeat exactly).
fn fit_args(out: &Path, epochs: usize) -> Vec<String> {
    [
        "fit",
        "--synthetic",
        "96",
        "--synthetic-size",
        "64",
        "--image-size",
        "32",
        "--preset",
        "small",
        "--batch-size",
        "8",
        "--set",
        "data.quality_share=0",
        "--epochs",
        &epochs.to_string(),
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

fn mpirun(ranks: usize, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string(), "--oversubscribe"])
        .arg(BIN)
        .args(args)
        // CI runs as root, which Open MPI refuses unless told twice.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn single(args: &[String]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env("RAYON_NUM_THREADS", "1");
    c
}

fn ok(mut c: Command) -> Output {
    let out = c.output().expect("runs");
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn summary(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("the summary on stdout")
}

/// Two ranks with half a batch each take the steps one process takes when it accumulates the
/// gradients of the same two halves: the same losses, validation and exported weights (to
/// float tolerance: the ranks' sums and the averaged statistics round differently), and the
/// ranks end with bit-identical weights.
#[test]
fn two_ranks_train_the_model_one_process_trains_by_accumulating_the_two_halves() {
    let dir = tempfile::tempdir().unwrap();
    let (two, one) = (dir.path().join("two"), dir.path().join("one"));
    let run = ok(mpirun(2, &fit_args(&two, 3)));
    let s = summary(&run);
    assert_eq!(s["ranks"], 2);
    let hashes = s["rank_weight_hashes"].as_array().unwrap();
    assert_eq!(hashes.len(), 2);
    assert_eq!(hashes[0], hashes[1], "the ranks' weights differ");
    // Rank 0 alone printed the summary and wrote the run.
    assert_eq!(
        String::from_utf8_lossy(&run.stdout)
            .matches("\"ranks\"")
            .count(),
        1
    );

    let mut args = fit_args(&one, 3);
    args.extend(["--set".into(), "accumulate=2".into()]);
    ok(single(&args));

    let (a, b) = (logs(&two), logs(&one));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.ranks, Some(2));
        assert!(x.allreduce_bytes_per_step.unwrap() > 4 * 100_000, "{x:?}");
        let close = |p: f64, q: f64| (p - q).abs() <= 1e-4 * p.abs().max(1.0);
        assert!(
            close(x.train_loss, y.train_loss),
            "epoch {}: {} vs {}",
            x.epoch,
            x.train_loss,
            y.train_loss
        );
        for (k, v) in &x.val {
            assert!(
                close(*v, y.val[k]),
                "epoch {}: {k} {v} vs {}",
                x.epoch,
                y.val[k]
            );
        }
    }
    let (wa, wb) = (exported_weights(&two), exported_weights(&one));
    assert_eq!(wa.len(), wb.len());
    let worst = wa
        .iter()
        .zip(&wb)
        .map(|(x, y)| (x - y).abs() / x.abs().max(1.0))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "the exported weights differ by up to {worst}");
    // ... and they are not trivially close: the run trained.
    assert!(a[2].train_loss < a[0].train_loss, "{a:?}");
}

/// A run continues with the number of ranks it started with, and refuses another.
#[test]
fn resuming_needs_the_same_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(mpirun(2, &fit_args(&out, 1)));
    let resume = |epochs: &str| -> Vec<String> {
        [
            "fit",
            "--resume",
            &out.display().to_string(),
            "--epochs",
            epochs,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let refused = single(&resume("2")).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("trained on 2 rank(s)") && err.contains("mpirun -np 2"),
        "{err}"
    );
    assert_eq!(logs(&out).len(), 1, "nothing trained");
    ok(mpirun(2, &resume("2")));
    let l = logs(&out);
    assert_eq!(l.iter().map(|l| l.epoch).collect::<Vec<_>>(), [1, 2]);
}

/// A non-finite loss stops every rank, and the run says so once.
#[test]
fn a_non_finite_loss_stops_all_ranks_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = fit_args(&out, 2);
    args.extend(["--learning-rate".into(), "1e30".into()]);
    let run = mpirun(2, &args).output().unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        err.matches("the loss became non-finite").count(),
        1,
        "{err}"
    );
    assert!(err.contains("ranks)"), "{err}");
    assert!(!err.contains("error on rank"), "not an abort: {err}");
}

fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

fn rank_of(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        std::str::from_utf8(kv)
            .ok()?
            .strip_prefix("OMPI_COMM_WORLD_RANK=")?
            .parse()
            .ok()
    })
}

fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Killing one rank mid-run ends the job with an error on the others, not a hang in the next
/// all-reduce.
#[test]
fn a_killed_rank_ends_the_run_with_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut job = mpirun(2, &fit_args(&out, 200))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once an epoch is done, every rank is deep in training.
    let t = Instant::now();
    while !out.join("metrics.jsonl").is_file() {
        assert!(t.elapsed() < Duration::from_secs(120), "no epoch finished");
        assert!(job.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let victim = children(job.id())
        .into_iter()
        .find(|&pid| rank_of(pid) == Some(1))
        .expect("rank 1 among mpirun's children");
    assert!(
        Command::new("kill")
            .args(["-9", &victim.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = wait(&mut job, Duration::from_secs(60));
    let Some(status) = status else {
        job.kill().unwrap();
        panic!("the surviving rank hung after rank 1 was killed");
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("rank 1") || err.contains("signal 9"), "{err}");
    assert!(logs(&out).len() < 200, "the run went on");
}

/// The ranks train on the GPU backend too (Mesa's software Vulkan driver in CI, where each
/// rank shares the one adapter; on a machine with discrete GPUs each takes its local rank's).
#[test]
fn ranks_train_on_the_wgpu_backend() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = fit_args(&out, 1);
    args.extend(["--backend".into(), "wgpu".into()]);
    // 48 eyes: the software rasteriser is slow.
    args[2] = "48".into();
    let run = ok(mpirun(2, &args));
    let s = summary(&run);
    assert!(s["backend"].as_str().unwrap().starts_with("wgpu"), "{s}");
    let hashes = s["rank_weight_hashes"].as_array().unwrap();
    assert_eq!(hashes.len(), 2);
    assert_eq!(hashes[0], hashes[1]);
}

/// Distillation refuses to run on several ranks (its projection is not all-reduced), with one
/// message and no abort, before any data is generated.
#[test]
fn distillation_refuses_several_ranks_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut args = fit_args(&out, 1);
    args[0] = "distill".into();
    args.extend([
        "--teacher".into(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/default-model").into(),
    ]);
    let run = mpirun(2, &args).output().unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        err.matches("distillation runs in one process").count(),
        1,
        "{err}"
    );
    assert!(err.contains("accumulate=K"), "{err}");
    assert!(!err.contains("error on rank"), "not an abort: {err}");
    assert!(!out.join("synthetic").exists(), "no data made");
}
