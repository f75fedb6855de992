//! Changing a configuration from outside: a TOML file's keys and `--set key=value` flags, the
//! differences between two configurations, and which keys a resumed run may change.
//!
//! Overrides work on the TOML form of a config: the base is written as a table, the file's
//! tables are merged into it key by key, each `--set` replaces one dotted path, and the result
//! is read back through `TrainConfig`'s serde (so `deny_unknown_fields` catches typos at every
//! level, and the message lists the valid keys there).

use super::{TrainConfig, located};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// One `--set key=value`: a dotted TOML path and a TOML value.
#[derive(Debug, Clone, PartialEq)]
pub struct Set {
    /// Dotted path, e.g. `optimizer.learning_rate`; a number indexes an array
    /// (`loss.heads.0.weight`).
    pub key: String,
    /// The value.
    pub value: Value,
}

impl Set {
    /// Sets `key` to `value`.
    pub fn new(key: &str, value: impl Into<Value>) -> Set {
        Set {
            key: key.to_string(),
            value: value.into(),
        }
    }
}

impl std::str::FromStr for Set {
    type Err = anyhow::Error;

    /// `key=value`; the value is read as a TOML value (`1e-3`, `true`, `[1.0, 2.0]`,
    /// `{ flips = false }`, `"text"`), and taken as a plain string when it is not one
    /// (`balanced`, `reference`).
    fn from_str(arg: &str) -> Result<Set> {
        let Some((key, raw)) = arg.split_once('=') else {
            bail!("--set {arg}: expected KEY=VALUE, e.g. --set optimizer.learning_rate=1e-3");
        };
        let key = key.trim();
        if key.is_empty() || key.split('.').any(|k| k.trim().is_empty()) {
            bail!("--set {arg}: the key must be a dotted path, e.g. optimizer.learning_rate");
        }
        let raw = raw.trim();
        let value = toml::from_str::<Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.to_string()));
        Ok(Set {
            key: key.to_string(),
            value,
        })
    }
}

impl std::fmt::Display for Set {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Changes to apply to a configuration: a TOML file's keys, then the `--set`s in order.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// A `train.toml`.
    pub file: Option<PathBuf>,
    /// `--set`s (and the shorthand flags), applied after the file.
    pub sets: Vec<Set>,
}

impl Overrides {
    /// Adds `key = value`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.sets.push(Set::new(key, value));
        self
    }

    /// No file and no sets.
    pub fn is_empty(&self) -> bool {
        self.file.is_none() && self.sets.is_empty()
    }

    /// The configuration of a new run: the file (or the defaults), then the sets.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let base = match &self.file {
            Some(p) => TrainConfig::load(p)?,
            None => TrainConfig::default(),
        };
        apply_sets(&base, &self.sets)
    }

    /// `base` (the configuration of a run being resumed) with the file's keys, then the sets.
    pub fn apply_to(&self, base: &TrainConfig) -> Result<TrainConfig> {
        let mut config = base.clone();
        if let Some(p) = &self.file {
            config = merge_file(&config, p)?;
        }
        apply_sets(&config, &self.sets)
    }
}

/// A config as a TOML table. Through the text, so that `f32` fields read as the short decimal
/// they print as (0.2, not 0.20000000298023224).
fn to_table(c: &TrainConfig) -> Result<Table> {
    Ok(toml::from_str(&c.to_toml()?)?)
}

fn from_table(t: Table) -> Result<TrainConfig, toml::de::Error> {
    Value::Table(t).try_into()
}

fn merge_file(base: &TrainConfig, path: &Path) -> Result<TrainConfig> {
    // Read the file alone first: its own mistakes are reported at `file:line:column`.
    TrainConfig::load(path)?;
    let text = std::fs::read_to_string(path)?;
    let file: Table = toml::from_str(&text).map_err(|e| located(path, &text, &e))?;
    let mut t = to_table(base)?;
    merge(&mut t, file);
    from_table(t).map_err(|e| anyhow!("{}: {}", path.display(), e.message()))
}

/// Merges `src` into `dst`: tables key by key, anything else replaced.
fn merge(dst: &mut Table, src: Table) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Table(d)), Value::Table(s)) => merge(d, s),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}

fn apply_sets(base: &TrainConfig, sets: &[Set]) -> Result<TrainConfig> {
    let mut t = to_table(base)?;
    let mut config = base.clone();
    for s in sets {
        insert(&mut t, &s.key, s.value.clone()).map_err(|e| anyhow!("--set {s}: {e}"))?;
        // Read back after each one, so an error names the `--set` that caused it.
        config = from_table(t.clone()).map_err(|e| {
            let mut msg = format!("--set {s}: {}", e.message().trim_end());
            if let Some(hint) = moved_key(&s.key) {
                msg.push_str(&format!(" (did you mean `{hint}`?)"));
            }
            anyhow!(msg)
        })?;
    }
    Ok(config)
}

/// The new place of a key of the former flat layout.
fn moved_key(key: &str) -> Option<&'static str> {
    Some(match key {
        "preset" => "model.preset",
        "image_size" => "model.image_size",
        "heads" => "model.heads",
        "graham" => "model.preprocess.graham",
        "learning_rate" => "optimizer.learning_rate",
        "weight_decay" => "optimizer.weight_decay",
        "warmup_epochs" => "schedule.warmup_epochs",
        "val_fraction" => "data.val_fraction",
        "sampling" => "data.sampling",
        "augment" => "data.augment",
        "cache_images" => "data.cache_images",
        _ => return None,
    })
}

/// Puts `value` at the dotted `key`, creating missing tables on the way.
fn insert(table: &mut Table, key: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    let mut here = table;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let path = parts[..=i].join(".");
        if last {
            here.insert(part.to_string(), value);
            return Ok(());
        }
        let next = here
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        here = match next {
            Value::Table(t) => t,
            Value::Array(items) => {
                let n: usize = parts[i + 1]
                    .parse()
                    .with_context(|| format!("`{path}` is a list: index it with a number"))?;
                let len = items.len();
                let item = items
                    .get_mut(n)
                    .with_context(|| format!("`{path}` has {len} entries; no entry {n}"))?;
                if i + 2 == parts.len() {
                    *item = value;
                    return Ok(());
                }
                match item {
                    Value::Table(t) => {
                        // Skip the index: continue below the entry.
                        return insert(t, &parts[i + 2..].join("."), value);
                    }
                    _ => bail!("`{path}.{n}` is not a table"),
                }
            }
            other => bail!("`{path}` is a {}, not a table", other.type_str()),
        };
    }
    unreachable!("a key has at least one part")
}

/// One difference between two configurations, by dotted key (absent: the field is unset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Dotted key.
    pub key: String,
    /// Value before.
    pub from: Option<Value>,
    /// Value after.
    pub to: Option<Value>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<Value>| v.as_ref().map_or("(unset)".into(), |v| v.to_string());
        write!(
            f,
            "{}: {} -> {}",
            self.key,
            show(&self.from),
            show(&self.to)
        )
    }
}

/// The keys whose values differ between `a` and `b` (tables compared key by key, lists whole).
pub fn changes(a: &TrainConfig, b: &TrainConfig) -> Result<Vec<Change>> {
    fn flatten(prefix: &str, t: &Table, out: &mut std::collections::BTreeMap<String, Value>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Table(sub) if !sub.is_empty() => flatten(&key, sub, out),
                Value::Table(_) => {}
                v => {
                    out.insert(key, v.clone());
                }
            }
        }
    }
    let (mut fa, mut fb) = Default::default();
    flatten("", &to_table(a)?, &mut fa);
    flatten("", &to_table(b)?, &mut fb);
    let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .map(|k| Change {
            key: k.clone(),
            from: fa.get(k).cloned(),
            to: fb.get(k).cloned(),
        })
        .collect())
}

/// Whether `key` may change when a run is resumed: `Ok`, or why not.
///
/// Safe are the keys that only steer the remaining steps: how long (`epochs`), how big a step
/// (`batch_size`, the learning rate and its schedule, clipping), what is exported
/// (`select_metric`) and memory use (`data.cache_images`). The others define what the
/// checkpoint and the logged epochs are, so a change would make the run a mix of two.
pub fn resume_rule(key: &str) -> Result<(), &'static str> {
    let section = key.split('.').next().unwrap_or(key);
    match (section, key) {
        (_, "epochs" | "batch_size" | "accumulate" | "select_metric" | "data.cache_images") => {
            Ok(())
        }
        ("schedule", _) => Ok(()),
        (_, "optimizer.learning_rate" | "optimizer.clip_grad_norm") => Ok(()),
        (_, "optimizer.kind") => Err(
            "the checkpoint holds this optimizer's state (Adam's moments or SGD's velocity); \
             another optimizer would start from nothing",
        ),
        ("optimizer", _) => Err(
            "the checkpointed optimizer state was accumulated with these settings; only the \
             learning rate and gradient clipping may change",
        ),
        ("model", _) => Err(
            "the checkpoint's weights belong to the run's network and preprocessing; start a \
             new run (--out) for another model",
        ),
        ("loss" | "distill", _) => Err(
            "the objective defines the run: its logged losses, class weights and the exported \
             epoch were measured with it",
        ),
        (_, "seed") => Err("the seed fixes the run's split, data order and augmentation"),
        (_, "data.val_fraction") => {
            Err("it changes the training/validation split the run has trained and selected on")
        }
        (_, "data.sampling" | "data.augment") => Err(
            "it changes the data distribution mid-run; a resumed run must continue the one it \
             resumes",
        ),
        (_, k) if k.starts_with("data.augment.") => Err(
            "it changes the data distribution mid-run; a resumed run must continue the one it \
             resumes",
        ),
        _ => Err("it is not one of the settings that may change mid-run"),
    }
}

/// The keys a resumed run may change.
pub const RESUMABLE: &str = "epochs, batch_size, accumulate, select_metric, data.cache_images, schedule.*, \
                             optimizer.learning_rate, optimizer.clip_grad_norm";

/// Checks that `changes` may be applied to a resumed run.
pub fn check_resume(changes: &[Change]) -> Result<()> {
    for c in changes {
        if let Err(why) = resume_rule(&c.key) {
            bail!("cannot change {c} when resuming: {why}. A resumed run may change {RESUMABLE}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_parse_as_toml_else_as_strings() {
        let s: Set = "optimizer.learning_rate=1e-3".parse().unwrap();
        assert_eq!(s.value, Value::Float(1e-3));
        assert_eq!("epochs=3".parse::<Set>().unwrap().value, Value::Integer(3));
        assert_eq!(
            "data.sampling=balanced".parse::<Set>().unwrap().value,
            Value::String("balanced".into())
        );
        assert_eq!(
            "data.augment=false".parse::<Set>().unwrap().value,
            Value::Boolean(false)
        );
        assert!("epochs".parse::<Set>().is_err());
        assert!("a..b=1".parse::<Set>().is_err());
    }

    #[test]
    fn sets_reach_every_level_and_typos_name_the_valid_keys() {
        let sets: Vec<Set> = [
            "optimizer.learning_rate=1e-3",
            "model.preset=reference",
            "data.sampling=balanced",
            "model.preprocess.graham=true",
            "optimizer.clip_grad_norm=1.0",
            "schedule.kind=constant",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let c = Overrides { file: None, sets }.resolve().unwrap();
        assert_eq!(c.optimizer.learning_rate, 1e-3);
        assert_eq!(c.model.preset, "reference");
        assert_eq!(c.data.sampling, crate::data::Sampling::Balanced);
        assert_eq!(c.model.preprocess.graham, Some(true));
        assert_eq!(c.optimizer.clip_grad_norm, Some(1.0));
        assert_eq!(c.schedule.kind, super::super::ScheduleKind::Constant);
        assert!(c.model_config().unwrap().preprocess.graham);

        let e = Overrides::default()
            .set("optimizer.learnig_rate", 1e-3)
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("optimizer.learnig_rate"), "{e}");
        assert!(
            e.contains("learning_rate") && e.contains("weight_decay") && e.contains("kind"),
            "the valid keys of [optimizer]: {e}"
        );
        let e = Overrides::default()
            .set("learning_rate", 1e-3)
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("optimizer.learning_rate"), "{e}");
        let e = Overrides::default()
            .set("epochs.x", 1)
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`epochs` is a integer") || e.contains("not a table"),
            "{e}"
        );
    }

    #[test]
    fn lists_are_indexed_and_changes_are_listed_by_key() {
        let base = Overrides::default()
            .set(
                "loss.heads",
                toml::from_str::<Table>("h = [{ head = \"fluid\" }]").unwrap()["h"].clone(),
            )
            .resolve()
            .unwrap();
        let c = Overrides::default()
            .set("loss.heads.0.weight", 0.5)
            .set("epochs", 3)
            .apply_to(&base)
            .unwrap();
        assert_eq!(c.loss.heads[0].weight, 0.5);
        let keys: Vec<String> = changes(&base, &c)
            .unwrap()
            .into_iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(keys, ["epochs", "loss.heads"]);
        assert!(check_resume(&changes(&base, &c).unwrap()).is_err());
        assert!(resume_rule("schedule.warmup_epochs").is_ok());
        assert!(resume_rule("optimizer.beta1").is_err());
        assert!(resume_rule("data.augment.flips").is_err());
    }
}
