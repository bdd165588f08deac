//! An upload's bytes on their way in: each chunk goes to a validator on a blocking thread and
//! to an [`ObjectWriter`] at once, so a file is checked and stored in one pass with memory
//! bounded by a few chunks, one unfinished row and one storage part — never the file. The
//! object becomes visible only when [`Intake::finish`] is called after every check passed;
//! any error (or the request going away) leaves nothing stored.

use bytes::Bytes;
use sparsegrad_engine::data::{CheckedFile, StreamingCheck};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{ApiError, ApiResult};
use crate::storage::{ObjectWriter, Storage};

/// Chunks queued for the validator: it keeps up with the network, so a short queue suffices.
const QUEUE: usize = 8;

pub struct Intake {
    writer: ObjectWriter,
    to_check: Option<mpsc::Sender<Bytes>>,
    checker: JoinHandle<sparsegrad_engine::Result<CheckedFile>>,
    /// The most bytes accepted, and what passing it means for the client.
    limit: u64,
    over_limit: fn(u64) -> ApiError,
    blank: bool,
}

/// The validated file, not yet visible under its key.
pub struct Checked {
    pub file: CheckedFile,
    pub writer: ObjectWriter,
}

impl Intake {
    pub fn new(
        storage: &Storage,
        key: &str,
        limit: u64,
        over_limit: fn(u64) -> ApiError,
    ) -> ApiResult<Intake> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
        // Parsing is CPU work: it runs beside the runtime, never on it.
        let checker = tokio::task::spawn_blocking(move || {
            let mut check = StreamingCheck::new();
            while let Some(chunk) = rx.blocking_recv() {
                check.feed(&chunk)?;
            }
            check.finish()
        });
        Ok(Intake {
            writer: storage.writer(key)?,
            to_check: Some(tx),
            checker,
            limit,
            over_limit,
            blank: true,
        })
    }

    /// Takes the next chunk. A validation error ends the intake early with that error.
    pub async fn push(&mut self, chunk: Bytes) -> ApiResult<()> {
        if self.writer.len() + chunk.len() as u64 > self.limit {
            return Err((self.over_limit)(self.limit));
        }
        if self.blank {
            self.blank = chunk.iter().all(u8::is_ascii_whitespace);
        }
        self.writer.write(&chunk).await?;
        let sent = match &self.to_check {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        };
        if !sent {
            // The validator stopped: it found an error, which is the answer.
            self.to_check = None;
            return Err(self.checked().await.err().unwrap_or_else(|| {
                ApiError::internal("the validator stopped before the end of the file")
            }));
        }
        Ok(())
    }

    async fn checked(&mut self) -> ApiResult<CheckedFile> {
        self.to_check = None;
        (&mut self.checker)
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| ApiError::invalid(e.to_string(), Some("file"), "invalid_file"))
    }

    /// Ends the input: the whole file's verdict, and the writer that will publish it.
    pub async fn finish(mut self) -> ApiResult<Checked> {
        if self.blank {
            return Err(ApiError::invalid(
                "the file is empty",
                Some("file"),
                "empty_file",
            ));
        }
        let file = self.checked().await?;
        Ok(Checked {
            file,
            writer: self.writer,
        })
    }
}
