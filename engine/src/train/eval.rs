//! Evaluation: loss and the task's metrics over a dataset.

use candle_core::{DType, D};

use super::events::EvalMetrics;
use crate::data::{collate, Dataset, Example};
use crate::metrics;
use crate::models::{Labels, Model, Task};
use crate::nn::Ctx;
use crate::Result;

/// Loss and task metrics over a dataset, in order, without dropout.
pub fn evaluate(model: &Model, data: &Dataset, batch_size: usize) -> Result<EvalMetrics> {
    let pad = model.pad_id();
    let (dtype, device) = (model.dtype(), model.weights.device.clone());
    let mut loss_sum = 0.0;
    let mut weight_sum = 0.0;
    let (mut pred_c, mut gold_c) = (Vec::new(), Vec::new());
    let (mut pred_v, mut gold_v) = (Vec::new(), Vec::new());
    for chunk in data.examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad, dtype, &device)?;
        // Causal LM needs the loss alone: taken chunk by chunk, never the whole logits.
        let (logits, loss) = if matches!(data.task, Task::CausalLm) {
            (None, model.forward_loss(&batch, &mut Ctx::inference())?)
        } else {
            let logits = model.forward(&batch, &mut Ctx::inference())?.detach();
            let loss = model.loss(&logits, &batch)?;
            (Some(logits), loss)
        };
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let w = match &batch.labels {
            Labels::NextToken { mask, .. } => {
                mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?
            }
            _ => chunk.len() as f64,
        };
        loss_sum += loss * w;
        weight_sum += w;
        match (&batch.labels, logits) {
            (Labels::Class(y), Some(logits)) => {
                pred_c.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
                gold_c.extend(y.to_vec1::<u32>()?);
            }
            (Labels::Value(y), Some(logits)) => {
                pred_v.extend(logits.to_dtype(DType::F64)?.to_vec1::<f64>()?);
                gold_v.extend(y.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            }
            _ => {}
        }
    }
    let loss = loss_sum / weight_sum.max(1e-12);
    let mut m = EvalMetrics {
        loss,
        examples: data.examples.len(),
        ..Default::default()
    };
    match &data.task {
        Task::Classification { num_labels } => {
            m.accuracy = Some(metrics::accuracy(&pred_c, &gold_c));
            m.macro_f1 = Some(metrics::macro_f1(&pred_c, &gold_c, *num_labels));
            m.matthews = Some(metrics::matthews(&pred_c, &gold_c, *num_labels));
        }
        Task::Regression => {
            m.pearson = Some(metrics::pearson(&pred_v, &gold_v));
            m.spearman = Some(metrics::spearman(&pred_v, &gold_v));
        }
        Task::CausalLm => m.perplexity = Some(loss.exp()),
    }
    Ok(m)
}
