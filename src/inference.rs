//! Models loaded for predictions: a base model with a fine-tune's delta applied, kept while
//! the same delta is asked for (the dashboard's predict box asks again and again; loading
//! dominates a small request). One model stays resident at most. Loading and running happen
//! on a blocking thread, never on the async runtime.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sparsegrad_engine::artifact::Artifact;
use sparsegrad_engine::data::{LabelMap, TextTokenizer};
use sparsegrad_engine::models::Model;
use sparsegrad_engine::train::{PredictInput, Prediction};

/// Base + delta, loaded for predictions.
struct Loaded {
    model: Model,
    tok: TextTokenizer,
    labels: Option<LabelMap>,
}

/// What one prediction request runs.
pub struct PredictRequest {
    /// The base model's local folder.
    pub model_dir: PathBuf,
    /// The delta's local `delta.safetensors`, and its digest (which names it for the cache).
    pub delta: PathBuf,
    pub delta_sha256: String,
    pub inputs: Vec<PredictInput>,
    pub max_seq_len: usize,
    pub max_new_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error(transparent)]
    Engine(#[from] sparsegrad_engine::Error),
    #[error("the inference thread stopped: {0}")]
    Thread(String),
}

#[derive(Default)]
pub struct Predictor {
    last: Mutex<Option<(String, Arc<Loaded>)>>,
    loads: AtomicUsize,
}

impl Predictor {
    /// How many times a model was loaded (not found in the cache).
    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::Relaxed)
    }

    /// Loads (or reuses) base + delta and predicts, on a blocking thread.
    pub async fn predict(
        self: &Arc<Self>,
        req: PredictRequest,
    ) -> Result<Vec<Prediction>, InferenceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let l = this.get(&req.model_dir, &req.delta, &req.delta_sha256)?;
            Ok(sparsegrad_engine::train::predict(
                &l.model,
                &l.tok,
                l.labels.as_ref(),
                &req.inputs,
                req.max_seq_len,
                req.max_new_tokens,
            )?)
        })
        .await
        .map_err(|e| InferenceError::Thread(e.to_string()))?
    }

    fn get(
        &self,
        model_dir: &Path,
        delta: &Path,
        delta_sha: &str,
    ) -> sparsegrad_engine::Result<Arc<Loaded>> {
        let key = format!("{}\n{delta_sha}", model_dir.display());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, l)) = last.as_ref() {
            if *k == key {
                return Ok(l.clone());
            }
        }
        // Loading under the lock: two requests for a new delta load it once.
        let art = Artifact::load(delta)?;
        let (model, tok, labels) = sparsegrad_engine::pipeline::load_for_inference(
            model_dir,
            Some(&art),
            None,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        let l = Arc::new(Loaded { model, tok, labels });
        *last = Some((key, l.clone()));
        Ok(l)
    }
}
