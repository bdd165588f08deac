//! `/v1/models`: the base models a tenant can fine-tune — the configured folder's (shared)
//! and the tenant's own, registered from an object-storage prefix or imported from GGUF.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::fine_tuning::find_model;
use super::objects::{List, ModelObject};
use super::{AppState, Json, Tenant};
use crate::db::registered_models::{self, ModelRow};
use crate::domain::estimate::shape_of;
use crate::domain::request::check_model_name;
use crate::domain::{catalog, BaseModel, ModelSource};
use crate::error::{ApiError, ApiResult};
use crate::storage::StorageError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/models", get(list).post(create))
        .route("/models/{id}", get(get_one))
}

fn object(m: &BaseModel, owned_by: &str) -> ModelObject {
    ModelObject {
        id: m.id.clone(),
        object: "model",
        created: m.created.unwrap_or(0),
        owned_by: owned_by.to_string(),
        architecture: m.architecture.clone(),
        hidden_size: m.config.get("hidden_size").cloned(),
        num_hidden_layers: m.config.get("num_hidden_layers").cloned(),
        intermediate_size: m.config.get("intermediate_size").cloned(),
        parameters: shape_of(&m.config).map(|s| s.params()),
        source: match &m.source {
            ModelSource::Dir { .. } => "models_dir",
            ModelSource::Storage { .. } => "storage",
        },
    }
}

fn row_model(r: &ModelRow) -> BaseModel {
    BaseModel {
        id: r.id.clone(),
        architecture: r.architecture.clone(),
        config: r.config.clone(),
        source: ModelSource::Storage {
            prefix: r.object_prefix.clone(),
        },
        created: Some(r.created_at.timestamp()),
    }
}

async fn list(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
) -> ApiResult<axum::Json<List<ModelObject>>> {
    let mut data = Vec::new();
    if let Some(dir) = st.cfg.models_dir.clone() {
        let shared = tokio::task::spawn_blocking(move || catalog::list_dir(&dir))
            .await
            .map_err(ApiError::internal)?;
        data.extend(shared.iter().map(|m| object(m, "system")));
    }
    for r in registered_models::list(&st.db, &tenant).await? {
        data.push(object(&row_model(&r), &tenant));
    }
    Ok(axum::Json(List::new(data, false)))
}

async fn get_one(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ModelObject>> {
    if let Some(r) = registered_models::get(&st.db, &tenant, &id).await? {
        return Ok(axum::Json(object(&row_model(&r), &tenant)));
    }
    match find_model(&st, &tenant, &id).await? {
        Some(m) => Ok(axum::Json(object(&m, "system"))),
        None => Err(ApiError::not_found("model", &id)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Source {
    /// A Hugging Face-layout folder already in object storage.
    Storage { prefix: String },
    /// A GGUF file in object storage, converted to a Hugging Face-layout folder.
    Gguf {
        key: String,
        #[serde(default)]
        dtype: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateModel {
    id: String,
    source: Source,
}

/// Keys a tenant may point at: not another tenant's, not the service's own job outputs, and
/// never an uploaded dataset (a file can be a valid dataset and a valid model at once; what
/// was validated as data must not be loaded as a model).
fn check_key(tenant: &str, key: &str, param: &str) -> ApiResult<String> {
    let k = key.trim_matches('/');
    let own = format!("tenants/{tenant}/");
    if k.starts_with(&format!("{own}files/")) || k == format!("{own}files") {
        return Err(ApiError::invalid(
            "an uploaded dataset file cannot be a model source",
            Some(param),
            "invalid_storage_key",
        ));
    }
    // A key the store cannot name (control characters, a part it refuses) is the request's
    // fault, not a storage error.
    let ok = !k.is_empty()
        && k.len() <= 1024
        && !k.chars().any(char::is_control)
        && object_store::path::Path::parse(k).is_ok()
        && !k.split('/').any(|s| s == ".." || s == "." || s.is_empty())
        && !k.starts_with("jobs/")
        && (!k.starts_with("tenants/") || k.starts_with(&own));
    if ok {
        Ok(k.to_string())
    } else {
        Err(ApiError::invalid(
            "a storage key (at most 1,024 characters, no control characters) outside `jobs/` \
             and other tenants' space, without `.`/`..` segments",
            Some(param),
            "invalid_storage_key",
        ))
    }
}

fn bad_model(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "invalid_model")
}

/// A model's small JSON/text object, refused past 1 MiB (config files are a few KiB).
async fn small_object(st: &AppState, key: &str, param: &str) -> ApiResult<bytes::Bytes> {
    match st.storage.get_small(key, 1 << 20).await {
        Err(e @ StorageError::TooLarge { .. }) => Err(bad_model(e.to_string(), param)),
        r => Ok(r?),
    }
}

/// Reads and checks `config.json` of a model under a prefix.
async fn stored_config(st: &AppState, prefix: &str, param: &str) -> ApiResult<(String, Value)> {
    let listed = st.storage.list(prefix).await?;
    let has = |name: &str| listed.iter().any(|k| k == &format!("{prefix}/{name}"));
    if !has("config.json") {
        return Err(bad_model(format!("no `{prefix}/config.json`"), param));
    }
    if !has("model.safetensors") && !has("model.safetensors.index.json") {
        return Err(bad_model(
            format!("no `{prefix}/model.safetensors` (or its index)"),
            param,
        ));
    }
    if !has("tokenizer.json") {
        return Err(bad_model(format!("no `{prefix}/tokenizer.json`"), param));
    }
    let raw = small_object(st, &format!("{prefix}/config.json"), param).await?;
    let cfg: Value =
        serde_json::from_slice(&raw).map_err(|e| bad_model(format!("config.json: {e}"), param))?;
    // The chat template is code that comes with the model: checked before it is registered.
    let mut templates = Vec::new();
    if has("tokenizer_config.json") {
        let raw = small_object(st, &format!("{prefix}/tokenizer_config.json"), param).await?;
        let tc: Value = serde_json::from_slice(&raw)
            .map_err(|e| bad_model(format!("tokenizer_config.json: {e}"), param))?;
        if let Some(t) = tc.get("chat_template").and_then(Value::as_str) {
            templates.push(t.to_string());
        }
    }
    if has("chat_template.jinja") {
        let raw = small_object(st, &format!("{prefix}/chat_template.jinja"), param).await?;
        templates.push(String::from_utf8_lossy(&raw).into_owned());
    }
    for t in templates {
        tokio::task::spawn_blocking(move || sparsegrad_engine::data::check_chat_template(&t))
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| bad_model(e.to_string(), param))?;
    }
    // The engine's own parser: the architecture and every size it will need, or why not.
    let arch = sparsegrad_engine::models::from_config(&cfg)
        .map_err(|e| bad_model(e.to_string(), param))?
        .arch();
    Ok((arch.as_str().to_string(), cfg))
}

async fn create(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Json(req): Json<CreateModel>,
) -> ApiResult<axum::Json<ModelObject>> {
    check_model_name(&req.id, "id")?;
    let taken = || {
        ApiError::conflict(
            format!("a model named `{}` already exists", req.id),
            "model_exists",
        )
    };
    if find_model(&st, &tenant, &req.id).await?.is_some() {
        return Err(taken());
    }
    let (prefix, source, arch, cfg) = match &req.source {
        Source::Storage { prefix } => {
            let p = check_key(&tenant, prefix, "source.prefix")?;
            let (arch, cfg) = stored_config(&st, &p, "source.prefix").await?;
            (
                p.clone(),
                json!({"type": "storage", "prefix": p}),
                arch,
                cfg,
            )
        }
        Source::Gguf { key, dtype } => {
            let k = check_key(&tenant, key, "source.key")?;
            let _permit = st.gates.import()?;
            // A prefix of this import's own: a concurrent import of the same id writes
            // elsewhere, and the loser deletes only what it wrote.
            let prefix = format!(
                "tenants/{tenant}/models/{}/{}",
                req.id,
                crate::db::new_id("import")
            );
            let (arch, cfg) = import_gguf(&st, &k, dtype.as_deref(), &prefix).await?;
            (
                prefix,
                json!({"type": "gguf", "key": k, "dtype": dtype}),
                arch,
                cfg,
            )
        }
    };
    let row = ModelRow {
        id: req.id.clone(),
        tenant_id: tenant.clone(),
        object_prefix: prefix.clone(),
        architecture: arch,
        config: cfg,
        source,
        created_at: chrono::Utc::now(),
    };
    match registered_models::insert(&st.db, &row).await? {
        Some(r) => Ok(axum::Json(object(&row_model(&r), &tenant))),
        None => {
            // A concurrent registration won; an import of ours must not linger.
            if matches!(req.source, Source::Gguf { .. }) {
                let _ = st.storage.delete_prefix(&prefix).await;
            }
            Err(taken())
        }
    }
}

/// Converts a stored GGUF file into a Hugging Face-layout folder under `prefix`.
async fn import_gguf(
    st: &AppState,
    key: &str,
    dtype: Option<&str>,
    prefix: &str,
) -> ApiResult<(String, Value)> {
    let dtype = sparsegrad_engine::pipeline::parse_dtype(dtype)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("source.dtype"), "invalid_value"))?;
    let work = st
        .cfg
        .data_dir
        .join("work")
        .join(crate::db::new_id("import"));
    // Named as stored: the import records the file it came from.
    let file_name = key.rsplit('/').next().unwrap_or("model.gguf");
    let gguf = work.join(file_name);
    let out = work.join("hf");
    let result = async {
        match st.storage.download(key, &gguf).await {
            Err(crate::storage::StorageError::NotFound(_)) => {
                return Err(ApiError::invalid(
                    format!("no object `{key}`"),
                    Some("source.key"),
                    "object_not_found",
                ))
            }
            r => r?,
        }
        let (g, o) = (gguf.clone(), out.clone());
        // Dequantising a whole model: a blocking thread.
        let limits = sparsegrad_engine::gguf::ImportLimits {
            max_params: st.cfg.max_import_params,
        };
        tokio::task::spawn_blocking(move || {
            sparsegrad_engine::gguf::import_gguf(&g, &o, dtype, &limits)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            if e.is_user_error() {
                ApiError::invalid(e.to_string(), Some("source.key"), "invalid_gguf")
            } else {
                ApiError::internal(e)
            }
        })?;
        let mut rd = tokio::fs::read_dir(&out)
            .await
            .map_err(ApiError::internal)?;
        while let Some(e) = rd.next_entry().await.map_err(ApiError::internal)? {
            let name = e.file_name().to_string_lossy().to_string();
            st.storage
                .put_file(&format!("{prefix}/{name}"), &e.path())
                .await?;
        }
        let (arch, cfg) = sparsegrad_engine::pretrained::read_config(&out)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("source.key"), "invalid_gguf"))?;
        Ok((arch.as_str().to_string(), cfg))
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&work).await;
    if result.is_err() {
        let _ = st.storage.delete_prefix(prefix).await;
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn storage_keys_stay_in_bounds() {
        let ok = |k: &str| super::check_key("t1", k, "p").is_ok();
        assert!(ok("models/bert"));
        assert!(ok("/imports/x.gguf"));
        assert!(ok("tenants/t1/models/m"));
        assert!(!ok("tenants/t2/files/f"));
        assert!(!ok("tenants/t1/files/file_x"));
        assert!(!ok("tenants/t1/files"));
        assert!(!ok("jobs/j/artifact/delta/delta.safetensors"));
        assert!(!ok("models/../jobs/x"));
        assert!(!ok("models//x"));
        assert!(!ok(""));
    }
}
