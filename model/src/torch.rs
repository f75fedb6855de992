//! Moving weights to and from PyTorch: safetensors files in the layout of a PyTorch
//! `state_dict` of the reference network (`shared/peer/model.py`).
//!
//! PyTorch names the modules `stem.0` (conv), `stem.1` (BN), `stage{k}.conv1`, `stage{k}.bn1`,
//! `stage{k}.shortcut.0/1`, and one `nn.Linear` per head. Stages with several blocks are
//! `stage{k}.{j}.…`; a head with a hidden layer is `nn.Sequential(Linear, ReLU, Linear)`, so
//! `{head}.0` and `{head}.2`. burn-store's PyTorch adapters do the rest (linear weights are
//! transposed, batch-norm `weight`/`bias` become `gamma`/`beta`).

use crate::bundle::{BundleError, apply_checked};
use crate::network::RetinaConfig;
use crate::network::RetinaNet;
use burn_store::{
    BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};
use std::path::Path;

/// The reference network calls the vessel-growth head `vessel`.
const HEAD_ALIASES: [(&str, &str); 1] = [("vessel_growth", "vessel")];

fn torch_head_name(name: &str) -> &str {
    HEAD_ALIASES
        .iter()
        .find(|(ours, _)| *ours == name)
        .map(|(_, theirs)| *theirs)
        .unwrap_or(name)
}

/// The names of the tensors in a safetensors file (its JSON header; no tensor is read).
pub fn tensor_names(path: &Path) -> Result<Vec<String>, BundleError> {
    Ok(header(path)?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

/// The key of a regression head's link in the file's metadata.
fn link_key(head: &str) -> String {
    format!("retina.{head}.link")
}

/// The link of each regression head of `config` as a PyTorch-layout file gives it: what
/// [`RetinaNet::export_torch`] recorded in the file's metadata, else the identity (a PyTorch
/// network's regression output is its value: the reference's vessel output is trained with L1).
/// A record that is neither `identity` nor `logistic` is an error naming the file and the key.
pub fn regression_links(
    path: &Path,
    config: &RetinaConfig,
) -> Result<Vec<(String, crate::Link)>, BundleError> {
    let regression = |h: &crate::HeadSpec| h.kind == crate::HeadKind::Regression;
    per_head(
        path,
        config,
        regression,
        link_key,
        "\"identity\" or \"logistic\"",
    )
}

/// What a file's metadata records for each head of `config` that `wanted` selects, under the
/// key `key(head)`: the default where it records nothing, an error naming the file, the key
/// and what was `expected` where the record is not one.
fn per_head<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    config: &RetinaConfig,
    wanted: impl Fn(&crate::HeadSpec) -> bool,
    key: impl Fn(&str) -> String,
    expected: &str,
) -> Result<Vec<(String, T)>, BundleError> {
    let meta = metadata(path)?;
    config
        .heads
        .iter()
        .filter(|h| wanted(h))
        .map(|h| {
            let value = recorded(path, &meta, &key(&h.name), expected)?;
            Ok((h.name.clone(), value.unwrap_or_default()))
        })
        .collect()
}

/// The value recorded under `key` in a file's metadata, `None` where there is none; an error
/// naming the file, the key and what was `expected` where it is not one.
fn recorded<T: serde::de::DeserializeOwned>(
    path: &Path,
    meta: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    expected: &str,
) -> Result<Option<T>, BundleError> {
    let Some(v) = meta.get(key) else {
        return Ok(None);
    };
    serde_json::from_value(v.clone())
        .map(Some)
        .map_err(|_| BundleError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("metadata `{key}` is {v}; expected {expected}"),
            ),
        })
}

/// The key of a head's pooling in the file's metadata.
fn pooling_key(head: &str) -> String {
    format!("retina.{head}.pooling")
}

/// The pooling of each head of `config` as a PyTorch-layout file gives it: what
/// [`RetinaNet::export_torch`] recorded (`retina.{head}.pooling`: `max` or `average_max`),
/// else the average (what PyTorch's reference network does). A record that is none of
/// `average`, `max`, `average_max` is an error naming the file and the key.
pub fn recorded_pooling(
    path: &Path,
    config: &RetinaConfig,
) -> Result<Vec<(String, crate::Pooling)>, BundleError> {
    let expected = "\"average\", \"max\" or \"average_max\"";
    per_head(path, config, |_| true, pooling_key, expected)
}

/// The key of the network's preprocessing (JSON of a [`crate::PreprocessConfig`]) in the file's
/// metadata.
pub const PREPROCESS_KEY: &str = "retina.preprocess";

/// The preprocessing a PyTorch-layout file records ([`RetinaNet::export_torch`] writes it):
/// `None` when it records none (a file PyTorch wrote), an error naming the file when the
/// record is not a preprocessing config.
pub fn recorded_preprocess(path: &Path) -> Result<Option<crate::PreprocessConfig>, BundleError> {
    let meta = metadata(path)?;
    let Some(text) = meta.get(PREPROCESS_KEY).and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| BundleError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("metadata `{PREPROCESS_KEY}` is not a preprocessing config: {e}"),
            ),
        })
}

/// The `__metadata__` of a safetensors file's header (empty when it has none).
fn metadata(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, BundleError> {
    Ok(header(path)?
        .remove("__metadata__")
        .and_then(|m| m.as_object().cloned())
        .unwrap_or_default())
}

/// A safetensors file's JSON header.
fn header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, BundleError> {
    use std::io::Read;
    let invalid = |m: String| BundleError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, m),
    };
    let mut f = std::fs::File::open(path).map_err(|source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| {
        invalid("not a safetensors file: shorter than its 8-byte header size".into())
    })?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(invalid(format!(
            "not a safetensors file: header of {len} bytes"
        )));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| invalid("truncated safetensors header".into()))?;
    serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("safetensors header is not a JSON object: {e}")))
}

/// Whether a PyTorch-layout file holds weights of `head`.
pub fn has_head(names: &[String], head: &crate::HeadSpec) -> bool {
    let prefix = format!("{}.", torch_head_name(&head.name));
    names.iter().any(|n| n.starts_with(&prefix))
}

/// `(burn prefix, torch prefix)` for every module of the network, both ending in `.`.
pub fn key_prefixes(config: &RetinaConfig) -> Vec<(String, String)> {
    let mut p = vec![
        ("trunk.stem.conv.".to_string(), "stem.0.".to_string()),
        ("trunk.stem.bn.".to_string(), "stem.1.".to_string()),
    ];
    for (i, stage) in config.trunk.stages.iter().enumerate() {
        for j in 0..stage.depth {
            let torch = if stage.depth == 1 {
                format!("stage{}.", i + 1)
            } else {
                format!("stage{}.{j}.", i + 1)
            };
            p.push((format!("trunk.stages.{i}.blocks.{j}."), torch));
        }
    }
    for (k, h) in config.heads.iter().enumerate() {
        let t = torch_head_name(&h.name);
        if h.hidden.is_some() {
            p.push((format!("heads.{k}.hidden."), format!("{t}.0.")));
            p.push((format!("heads.{k}.out."), format!("{t}.2.")));
        } else {
            p.push((format!("heads.{k}.out."), format!("{t}.")));
        }
    }
    p
}

fn escape(s: &str) -> String {
    s.replace('.', r"\.")
}

fn remapper(config: &RetinaConfig, to_torch: bool) -> KeyRemapper {
    let mut pairs: Vec<(String, String)> = key_prefixes(config)
        .into_iter()
        .map(|(burn, torch)| {
            if to_torch {
                (format!("^{}", escape(&burn)), torch)
            } else {
                (format!("^{}", escape(&torch)), burn)
            }
        })
        .collect();
    // Inside a block the projection shortcut is `downsample.{conv,bn}` here, `shortcut.{0,1}`
    // there. Applied after the prefix patterns (all patterns run in order).
    let inner = [
        (".downsample.conv.", ".shortcut.0."),
        (".downsample.bn.", ".shortcut.1."),
    ];
    for (ours, theirs) in inner {
        pairs.push(if to_torch {
            (escape(ours), theirs.to_string())
        } else {
            (escape(theirs), ours.to_string())
        });
    }
    KeyRemapper::from_patterns(pairs).expect("generated patterns are valid regexes")
}

impl RetinaNet {
    /// Writes the weights as a PyTorch-layout safetensors file (`torch.nn.Module.load_state_dict`
    /// accepts it for the matching PyTorch module). Written atomically. The file's metadata
    /// records what the weights alone do not say: the preprocessing the network was trained
    /// with ([`PREPROCESS_KEY`], read back by [`recorded_preprocess`]), and each regression
    /// head with the logistic link (`retina.{head}.link`, read back by [`regression_links`]),
    /// and each head that does not pool by the average (`retina.{head}.pooling`, read back by
    /// [`recorded_pooling`]; a PyTorch module loading the file must pool that way too).
    pub fn export_torch(&self, config: &RetinaConfig, path: &Path) -> Result<(), BundleError> {
        let preprocess =
            serde_json::to_string(&config.preprocess).map_err(|e| BundleError::Write {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let mut store = SafetensorsStore::from_file(path)
            .with_to_adapter(BurnToPyTorchAdapter)
            .remap(remapper(config, true))
            .map_indices_contiguous(false)
            .overwrite(true)
            .metadata(PREPROCESS_KEY, preprocess);
        for h in &config.heads {
            if h.link == crate::Link::Logistic {
                store = store.metadata(link_key(&h.name), "logistic");
            }
            if h.pooling != crate::Pooling::Average {
                store = store.metadata(pooling_key(&h.name), h.pooling.to_string());
            }
        }
        self.save_into(&mut store).map_err(|e| BundleError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Loads weights from a PyTorch-layout safetensors file into this network; every tensor the
    /// network has must be present with the right shape.
    pub fn import_torch(&mut self, config: &RetinaConfig, path: &Path) -> Result<(), BundleError> {
        if !path.is_file() {
            return Err(BundleError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let mut store = SafetensorsStore::from_file(path)
            .with_from_adapter(PyTorchToBurnAdapter)
            .remap(remapper(config, false))
            .map_indices_contiguous(false)
            .validate(false)
            .allow_partial(true);
        apply_checked(self, &mut store, path, |name| {
            name.ends_with("num_batches_tracked")
        })
    }
}
