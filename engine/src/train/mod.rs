//! Training a model with a method: the loop's settings ([`config`]), what it reports
//! ([`events`]), its checkpoints ([`checkpoint`]), the loop itself ([`trainer`]), evaluation
//! ([`eval`]) and predictions with the result ([`predict`]).

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod events;
pub mod predict;
pub mod trainer;

pub use checkpoint::{read_checkpoint, save_checkpoint, CheckpointMeta};
pub use config::{Epochs, TrainConfig};
pub use eval::evaluate;
pub use events::{
    peak_rss_bytes, reset_peak_rss, rss_bytes, EvalMetrics, Event, Progress, TrainIo, TrainSummary,
};
pub use predict::{predict, predict_with, PredictInput, Prediction, Sampling};
pub use trainer::train;
