//! Finding a checkpoint: a local directory as is, or a Hugging Face repository id downloaded into
//! the standard cache (`$HF_HOME/hub`, `~/.cache/huggingface/hub`), with progress bars.
//! `HF_HUB_OFFLINE=1` uses the cache only.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use super::safetensors::{INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};

/// Files a checkpoint may have that loading reads (weights come from the index or are
/// `model.safetensors`).
const FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// Where and whether to reach the Hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// Use the local cache only.
    pub offline: bool,
    /// The cache directory (the `hub` folder); `$HF_HOME/hub` or `~/.cache/huggingface/hub` otherwise.
    pub cache_dir: Option<PathBuf>,
}

impl HubOptions {
    /// `HF_HUB_OFFLINE` and `HF_HOME` from the environment.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        Self { offline, cache_dir: None }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

/// The local directory of `id_or_dir`: the directory itself if it exists, else the snapshot of
/// the Hub repository `owner/name` (optionally `owner/name@revision`), downloaded if needed.
pub fn resolve(id_or_dir: &str) -> Result<PathBuf> {
    resolve_with(id_or_dir, &HubOptions::from_env())
}

/// [`resolve`] with explicit Hub options.
pub fn resolve_with(id_or_dir: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(id_or_dir);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let (repo_id, revision) = match id_or_dir.split_once('@') {
        Some((id, revision)) => (id, Some(revision)),
        None => (id_or_dir, None),
    };
    let looks_like_repo = repo_id.split('/').count() == 2 && !repo_id.starts_with('.') && !repo_id.starts_with('/');
    if path.exists() || !looks_like_repo {
        return Err(Error::Input(format!(
            "{id_or_dir} is neither a checkpoint directory nor a Hugging Face repository id (owner/name)"
        )));
    }
    let repo = match revision {
        Some(revision) => Repo::with_revision(repo_id.into(), RepoType::Model, revision.into()),
        None => Repo::new(repo_id.into(), RepoType::Model),
    };
    if options.offline {
        return from_cache(&repo, options, "offline mode (HF_HUB_OFFLINE)");
    }
    match download(&repo, options) {
        Ok(dir) => Ok(dir),
        Err(reason) => from_cache(&repo, options, &reason),
    }
}

fn download(repo: &Repo, options: &HubOptions) -> std::result::Result<PathBuf, String> {
    let mut builder = ApiBuilder::from_env().with_progress(true);
    if let Some(dir) = &options.cache_dir {
        builder = builder.with_cache_dir(dir.clone());
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let api = api.repo(repo.clone());
    let info = api.info().map_err(|e| e.to_string())?;
    let present: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let mut config = None;
    for file in FILES.iter().filter(|f| present.contains(f)) {
        let local = api.get(file).map_err(|e| format!("{file}: {e}"))?;
        if *file == "config.json" {
            config = Some(local);
        }
    }
    let dir = config.and_then(|c| c.parent().map(Path::to_path_buf)).ok_or("the repository has no config.json")?;
    if present.contains(&INDEX_FILE) {
        let index = api.get(INDEX_FILE).map_err(|e| e.to_string())?;
        for shard in shards(&index)? {
            api.get(&shard).map_err(|e| format!("{shard}: {e}"))?;
        }
    } else if present.contains(&SINGLE_FILE) {
        api.get(SINGLE_FILE).map_err(|e| e.to_string())?;
    } else {
        return Err("the repository has no safetensors weights".into());
    }
    Ok(dir)
}

fn from_cache(repo: &Repo, options: &HubOptions, why_not_online: &str) -> Result<PathBuf> {
    let cache = options.cache();
    let cached = cache.repo(repo.clone());
    let missing = |what: &str| Error::Hub {
        repo: repo.url(),
        message: format!(
            "{what} is not in the local cache ({}) and the Hub could not be used ({why_not_online}); \
             download it once with network access, or pass a local directory",
            cache.path().display()
        ),
    };
    let config = cached.get("config.json").ok_or_else(|| missing("config.json"))?;
    let dir = config.parent().map(Path::to_path_buf).ok_or_else(|| missing("the snapshot directory"))?;
    if let Some(index) = cached.get(INDEX_FILE) {
        for shard in shards(&index).map_err(|reason| missing(&reason))? {
            cached.get(&shard).ok_or_else(|| missing(&shard))?;
        }
    } else {
        cached.get(SINGLE_FILE).ok_or_else(|| missing("model.safetensors"))?;
    }
    Ok(dir)
}

/// Shard file names listed in an index.
fn shards(index: &Path) -> std::result::Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| e.to_string())?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or("index without weight_map")?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_directories_resolve_to_themselves() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve(dir.path().to_str().unwrap()).unwrap(), dir.path());
    }

    #[test]
    fn paths_that_are_not_repo_ids_are_input_errors() {
        assert!(matches!(resolve("/no/such/model"), Err(Error::Input(_))));
        assert!(matches!(resolve("no-slash"), Err(Error::Input(_))));
    }

    #[test]
    fn offline_cache_miss_names_the_repo() {
        let cache = tempfile::tempdir().unwrap();
        let options = HubOptions { offline: true, cache_dir: Some(cache.path().to_path_buf()) };
        let error = resolve_with("OpenGVLab/InternVL3-1B-hf", &options).unwrap_err();
        assert!(matches!(&error, Error::Hub { repo, .. } if repo == "OpenGVLab/InternVL3-1B-hf"), "{error}");
        assert!(error.to_string().contains("not in the local cache"), "{error}");
    }
}
