//! The engine commands: training, evaluation and predictions on local files, with the same
//! engine the workers run.

use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use sparsegrad_engine::artifact::Artifact;
use sparsegrad_engine::device::parse_device;
use sparsegrad_engine::models::Task;
use sparsegrad_engine::pipeline::{self, RunSpec};
use sparsegrad_engine::train::{Event, PredictInput, TrainIo};

use super::cli::{EvalArgs, PredictArgs, TrainArgs};

pub fn train(a: TrainArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let r = sparsegrad_engine::methods::resolve(
        a.method.method.as_deref(),
        &a.hyperparameters(),
        Some(a.seed),
    )?;
    let spec = RunSpec {
        model_dir: a.model.clone(),
        model_name: None,
        train_file: a.train.clone(),
        valid_file: a.valid.clone(),
        task: a.task.clone(),
        method: r.method,
        train: r.train,
        max_seq_len: r.max_seq_len,
        dtype: Some(a.dtype.clone()),
        limit_train: a.limit_train,
        limit_valid: a.limit_valid,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let cancel = AtomicBool::new(false);
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut on_event = |e: &Event| match e {
        Event::Started {
            total_steps,
            start_step,
            ..
        } => {
            eprintln!("{e}");
            if tty {
                let b = indicatif::ProgressBar::new(*total_steps as u64);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} [{elapsed}<{eta}] {msg}",
                    )
                    .expect("valid template"),
                );
                b.set_position(*start_step as u64);
                bar = Some(b);
            }
        }
        Event::Step(p) => match &bar {
            Some(b) => {
                b.set_position(p.step as u64);
                b.set_message(format!(
                    "loss {:.4} lr {:.2e} {:.0} tok/s",
                    p.loss, p.lr, p.tokens_per_sec
                ));
            }
            None => eprintln!("{e}"),
        },
        Event::Eval { .. } | Event::Checkpoint { .. } => match &bar {
            Some(b) => b.println(e.to_string()),
            None => eprintln!("{e}"),
        },
    };
    let io = TrainIo {
        on_event: &mut on_event,
        cancel: &cancel,
        drain: None,
        cache_dir: a.basis_cache.clone(),
        checkpoint_dir: Some(a.out.join("checkpoints")),
        resume_from: a.resume.clone(),
    };
    let out = pipeline::run_job(&spec, &device, io)?;
    if let Some(b) = &bar {
        b.finish();
    }
    out.artifact.save(&a.out)?;
    let metrics = serde_json::json!({
        "eval": out.summary.eval,
        "steps": out.summary.steps,
        "tokens": out.summary.tokens,
        "wall_secs": out.summary.wall_secs,
        "final_loss": out.summary.final_loss,
        "peak_rss_bytes": out.summary.peak_rss_bytes,
        "losses": out.summary.losses,
        "trainable_params": out.summary.trainable_params,
        "optimizer_state": out.summary.optimizer_state,
        "step_secs": out.summary.step_secs,
        "calibration_secs": out.summary.calibration_secs,
        "method_stats": out.summary.method_stats,
        "initialised": out.load_report.initialised,
        "train_rows": out.train_stats.rows,
        "truncated_rows": out.train_stats.truncated,
    });
    // Written last and whole (renamed into place): its presence marks a finished run.
    let tmp = a.out.join("metrics.json.partial");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&metrics)?)?;
    std::fs::rename(&tmp, a.out.join("metrics.json"))?;
    println!("{}", serde_json::to_string_pretty(&metrics["eval"])?);
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let art = a.artifact.as_ref().map(|p| Artifact::load(p)).transpose()?;
    let (model, tok, labels) = match &art {
        Some(art) => pipeline::load_for_inference(
            &a.model,
            Some(art),
            None,
            candle_core::DType::F32,
            &device,
        )?,
        None => {
            // Without an artifact the label map comes from the data itself.
            let recs = sparsegrad_engine::data::read_records(&a.data)?;
            let (task, labels) = sparsegrad_engine::data::infer_task(&recs, a.task.as_deref())?;
            let (m, t, _) = pipeline::load_for_inference(
                &a.model,
                None,
                Some(task),
                candle_core::DType::F32,
                &device,
            )?;
            (m, t, labels)
        }
    };
    let ds = pipeline::load_dataset(
        &a.data,
        &tok,
        None,
        Some((&model.task, labels.as_ref())),
        a.max_seq_len,
        a.limit,
    )?;
    let m = sparsegrad_engine::train::evaluate(&model, &ds, a.batch_size)?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let art = a.artifact.as_ref().map(|p| Artifact::load(p)).transpose()?;
    let (model, tok, labels) = pipeline::load_for_inference(
        &a.model,
        art.as_ref(),
        None,
        candle_core::DType::F32,
        &device,
    )?;
    let mut inputs: Vec<PredictInput> = a
        .inputs
        .iter()
        .map(|t| match model.task {
            Task::CausalLm => PredictInput::Prompt { prompt: t.clone() },
            _ => PredictInput::Text { text: t.clone() },
        })
        .collect();
    if let Some(f) = &a.inputs_file {
        for (i, line) in std::fs::read_to_string(f)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            inputs.push(
                serde_json::from_str(line)
                    .with_context(|| format!("{}: line {}", f.display(), i + 1))?,
            );
        }
    }
    let sampling = sparsegrad_engine::train::Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: a.stop.clone(),
    };
    let preds = sparsegrad_engine::train::predict_with(
        &model,
        &tok,
        labels.as_ref(),
        &inputs,
        a.max_seq_len,
        a.max_new_tokens,
        &sampling,
    )?;
    println!("{}", serde_json::to_string_pretty(&preds)?);
    Ok(())
}
