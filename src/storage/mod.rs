//! Object storage behind one handle, built from a URL:
//! - `file:///abs/dir` (the embedded default, under the data dir),
//! - `s3://bucket/prefix` (endpoint, region and static credentials from config; path-style
//!   requests; plain http allowed for local servers; never the cloud metadata service),
//! - `memory://` (unit tests).
//!
//! Keys are `/`-separated and relative to the URL's prefix; [`keys`] names where each kind of
//! object lives. Large objects go up in parts. [`local_copy`] keeps local copies of stored
//! base models.

pub mod local_copy;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncReadExt;

/// Part size for multipart uploads (S3's minimum is 5 MiB).
const PART: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object `{0}` not found")]
    NotFound(String),
    #[error("storage URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("object `{0}` does not have the digest it was stored with")]
    Corrupt(String),
    #[error("object `{key}` is larger than {max} bytes")]
    TooLarge { key: String, max: u64 },
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// S3 settings from the service config (unused for `file://` and `memory://`).
/// `Debug` shows no secret (secrecy redacts it).
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    pub allow_http: bool,
    /// Retries per request (object_store's default is 10 with long backoff; tests shorten it).
    pub max_retries: Option<usize>,
    pub retry_timeout: Option<Duration>,
}

/// One stored object as a listing shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: chrono::DateTime<chrono::Utc>,
}

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    url: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("url", &self.url).finish()
    }
}

fn bad(url: &str, reason: impl Into<String>) -> StorageError {
    StorageError::BadUrl {
        url: url.into(),
        reason: reason.into(),
    }
}

impl Storage {
    pub fn from_url(url: &str, s3: &S3Settings) -> Result<Storage> {
        let store: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad(url, "file:// needs an absolute path"));
            }
            std::fs::create_dir_all(dir)?;
            Arc::new(LocalFileSystem::new_with_prefix(dir)?)
        } else if url == "memory://" || url.starts_with("memory://") {
            Arc::new(InMemory::new())
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(url, "no bucket"));
            }
            let (Some(key), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) else {
                // Without static credentials the S3 client would ask the instance metadata
                // service; a service must say what is missing instead.
                return Err(bad(
                    url,
                    "S3 needs an access key id and a secret access key",
                ));
            };
            let mut retry = RetryConfig::default();
            if let Some(n) = s3.max_retries {
                retry.max_retries = n;
            }
            if let Some(t) = s3.retry_timeout {
                retry.retry_timeout = t;
            }
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(s3.region.clone().unwrap_or_else(|| "us-east-1".into()))
                .with_access_key_id(key)
                .with_secret_access_key(secret.expose_secret())
                .with_virtual_hosted_style_request(false)
                .with_allow_http(s3.allow_http)
                .with_retry(retry);
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e);
            }
            let s3store = b.build()?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3store)
            } else {
                Arc::new(PrefixStore::new(s3store, prefix))
            }
        } else {
            return Err(bad(url, "use file:///dir, s3://bucket/prefix or memory://"));
        };
        Ok(Storage {
            store,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(key: &str) -> Result<ObjPath> {
        ObjPath::parse(key).map_err(|e| StorageError::Store(e.into()))
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&Self::path(key)?, PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// Uploads a local file, in parts when it is large; a failed upload leaves no object.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<u64> {
        let mut f = tokio::fs::File::open(file).await?;
        let mut w = self.writer(key)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n]).await?;
        }
        w.finish().await
    }

    /// A writer for `key`; see [`ObjectWriter`].
    pub fn writer(&self, key: &str) -> Result<ObjectWriter> {
        Ok(ObjectWriter {
            store: self.store.clone(),
            path: Self::path(key)?,
            buf: Vec::new(),
            parts: None,
            len: 0,
        })
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        match self.store.get(&Self::path(key)?).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        match self.store.get_range(&Self::path(key)?, range).await {
            Ok(b) => Ok(b),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Size in bytes, or `None` when absent.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.store.head(&Self::path(key)?).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// An object as a stream of chunks, with its size (large objects never sit in memory).
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<(u64, futures::stream::BoxStream<'static, Result<Bytes>>)> {
        use futures::StreamExt;
        match self.store.get(&Self::path(key)?).await {
            Ok(r) => {
                let size = r.meta.size;
                Ok((size, r.into_stream().map(|c| c.map_err(Into::into)).boxed()))
            }
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// A byte range of an object as a stream of chunks (a large range never sits in memory).
    pub async fn get_range_stream(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes>>> {
        use futures::StreamExt;
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(range)),
            ..Default::default()
        };
        match self.store.get_opts(&Self::path(key)?, opts).await {
            Ok(r) => Ok(r.into_stream().map(|c| c.map_err(Into::into)).boxed()),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// A small object whole, or [`StorageError::TooLarge`] past `max` bytes: one read that
    /// stops there (a size asked for first could change before the read).
    pub async fn get_small(&self, key: &str, max: u64) -> Result<Bytes> {
        use futures::StreamExt;
        let too_large = || StorageError::TooLarge {
            key: key.into(),
            max,
        };
        let (size, mut chunks) = self.get_stream(key).await?;
        if size > max {
            return Err(too_large());
        }
        let mut out = Vec::with_capacity(size as usize);
        while let Some(c) = chunks.next().await {
            let c = c?;
            if (out.len() + c.len()) as u64 > max {
                return Err(too_large());
            }
            out.extend_from_slice(&c);
        }
        Ok(out.into())
    }

    /// Writes an object to a local file, streamed through a temporary name so a failure
    /// leaves none.
    pub async fn download(&self, key: &str, to: &Path) -> Result<()> {
        self.download_checked(key, to, None).await
    }

    /// Downloads `key` to `to` through a temporary file of its own (concurrent downloads of
    /// one object never share one) renamed into place once complete — and, with `sha256`,
    /// only if the bytes have that digest.
    pub async fn download_checked(&self, key: &str, to: &Path, sha256: Option<&str>) -> Result<()> {
        use futures::StreamExt;
        use sha2::{Digest, Sha256};
        use tokio::io::AsyncWriteExt;
        let (_, mut chunks) = self.get_stream(key).await?;
        if let Some(d) = to.parent() {
            tokio::fs::create_dir_all(d).await?;
        }
        let name = to
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = to.with_file_name(format!(".{name}.{}.part", crate::db::new_id("dl")));
        let mut f = tokio::fs::File::create(&tmp).await?;
        // Hashed only when there is a digest to check against.
        let mut h = sha256.map(|_| Sha256::new());
        let written: Result<()> = async {
            while let Some(c) = chunks.next().await {
                let c = c?;
                if let Some(h) = &mut h {
                    h.update(&c);
                }
                f.write_all(&c).await?;
            }
            f.flush().await?;
            Ok(())
        }
        .await;
        drop(f);
        let digest = h.map(|h| hex::encode(h.finalize()));
        let checked = written.and_then(|()| match (sha256, digest) {
            (Some(want), Some(got)) if got != want => Err(StorageError::Corrupt(key.to_string())),
            _ => Ok(()),
        });
        if let Err(e) = checked {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, to).await?;
        Ok(())
    }

    /// Keys under a prefix, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = Self::path(prefix)?;
        let mut keys: Vec<String> = self
            .store
            .list(Some(&p))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await?;
        keys.sort();
        Ok(keys)
    }

    /// Objects under a prefix with their sizes and last-modified times, sorted by key.
    pub async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = Self::path(prefix)?;
        let mut out: Vec<ObjectInfo> = self
            .store
            .list(Some(&p))
            .map_ok(|m| ObjectInfo {
                key: m.location.to_string(),
                size: m.size,
                modified: m.last_modified,
            })
            .try_collect()
            .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The size and sha256 of an object, read as a stream (never whole in memory).
    pub async fn digest(&self, key: &str) -> Result<(u64, String)> {
        use futures::StreamExt;
        use sha2::{Digest, Sha256};
        let (_, mut chunks) = self.get_stream(key).await?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(c) = chunks.next().await {
            let c = c?;
            n += c.len() as u64;
            h.update(&c);
        }
        Ok((n, hex::encode(h.finalize())))
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&Self::path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let keys = self.list(prefix).await?;
        for k in &keys {
            self.delete(k).await?;
        }
        Ok(keys.len())
    }

    /// Reachability for `/readyz`: a list call that must answer.
    pub async fn check(&self) -> Result<()> {
        let p = Self::path("readyz")?;
        let _ = self.store.list(Some(&p)).try_collect::<Vec<_>>().await?;
        Ok(())
    }
}

/// An object written as its bytes arrive: up to one part is held in memory, then parts go
/// up as they fill, at most [`PARTS_IN_FLIGHT`] at a time, so memory stays bounded whatever
/// the size. Nothing is visible under the key until [`finish`](Self::finish); an error,
/// [`abort`](Self::abort) or a drop (a client that went away mid-upload) leaves no object:
/// the parts sent so far are aborted.
pub struct ObjectWriter {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    buf: Vec<u8>,
    parts: Option<WriteMultipart>,
    len: u64,
}

/// Parts of one object uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

impl ObjectWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.len += chunk.len() as u64;
        if let Some(w) = &mut self.parts {
            w.wait_for_capacity(PARTS_IN_FLIGHT).await?;
            w.write(chunk);
            return Ok(());
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > PART {
            let upload = self.store.put_multipart(&self.path).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            w.write(&std::mem::take(&mut self.buf));
            self.parts = Some(w);
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the object visible; its size.
    pub async fn finish(mut self) -> Result<u64> {
        match self.parts.take() {
            Some(w) => {
                w.finish().await?;
            }
            None => {
                let bytes = Bytes::from(std::mem::take(&mut self.buf));
                self.store.put(&self.path, PutPayload::from(bytes)).await?;
            }
        }
        Ok(self.len)
    }

    /// Drops what was written; nothing becomes visible.
    pub async fn abort(mut self) {
        if let Some(w) = self.parts.take() {
            let _ = w.abort().await;
        }
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        // Dropped unfinished (the request went away): abort the parts in the background so no
        // incomplete upload lingers in the bucket.
        if let Some(w) = self.parts.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = w.abort().await;
                });
            }
        }
    }
}

/// Where each kind of object lives.
pub mod keys {
    pub fn file(tenant: &str, file_id: &str) -> String {
        format!("tenants/{tenant}/files/{file_id}")
    }
    /// What one attempt of a job stores lives under that attempt's own prefix: a zombie
    /// attempt (its lease lost, still running) can only overwrite its own objects, which no
    /// fenced row of the winning attempt names, so its bytes are never served.
    pub fn attempt_prefix(job_id: &str, attempt: i32) -> String {
        format!("jobs/{job_id}/attempt-{attempt}")
    }
    pub fn artifact(job_id: &str, attempt: i32, name: &str) -> String {
        format!("{}/artifact/{name}", attempt_prefix(job_id, attempt))
    }
    pub fn checkpoint_prefix(job_id: &str, attempt: i32, step: usize) -> String {
        format!(
            "{}/checkpoints/step-{step}",
            attempt_prefix(job_id, attempt)
        )
    }
}
