//! Artifacts: what a method trained, as one safetensors file (`delta.safetensors`) plus a
//! JSON descriptor (`delta.json`, also embedded in the safetensors metadata). `apply` puts a
//! delta onto a loaded base model in memory; `merge` writes a Hugging Face-layout folder.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::LabelMap;
use crate::io::{sha256_files, write_json, write_safetensors};
use crate::methods::sparsegrad::basis::Basis;
use crate::methods::sparsegrad::basis_tensor_name;
use crate::methods::sparsegrad::state::{expand_plain, HostBasis};
use crate::methods::{BasisSide, DeltaEntry};
use crate::models::{Arch, MlpKind, Model, Task};
use crate::nn::Param;
use crate::pretrained::{copy_tokenizer_files, read_config, read_tensors, weight_files};
use crate::{Error, Result};

pub const FORMAT: &str = "sparsegrad-delta";
/// 2: SparseGrad bases stored compact (only the columns the support uses, with a
/// `{basis}.columns` map) and sparse indices as int16 where every dimension fits; version 1
/// files (full bases, int32 indices) still load.
pub const FORMAT_VERSION: u32 = 2;

/// The suffix of the column map stored beside a compact basis.
const COLUMNS: &str = ".columns";
pub const TENSORS_FILE: &str = "delta.safetensors";
pub const DESCRIPTOR_FILE: &str = "delta.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Descriptor {
    pub format: String,
    pub format_version: u32,
    pub arch: Arch,
    pub task: Task,
    pub method: String,
    pub hyperparameters: serde_json::Value,
    /// sha256 of the base model's weight files (see `io::sha256_files`).
    pub base_model_sha256: String,
    /// Where the base model came from, as given (informational).
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub labels: Option<LabelMap>,
    pub entries: BTreeMap<String, DeltaEntry>,
    #[serde(default)]
    pub training: serde_json::Value,
}

pub struct Artifact {
    pub descriptor: Descriptor,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Artifact {
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let desc = serde_json::to_string(&self.descriptor).expect("serialisable");
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        meta.insert("method".to_string(), self.descriptor.method.clone());
        meta.insert(
            "base_model_sha256".to_string(),
            self.descriptor.base_model_sha256.clone(),
        );
        meta.insert("descriptor".to_string(), desc);
        write_safetensors(&self.file_tensors()?, Some(meta), &dir.join(TENSORS_FILE))?;
        write_json(&dir.join(DESCRIPTOR_FILE), &self.descriptor)
    }

    /// Loads from a folder holding `delta.safetensors` (the descriptor is read from its
    /// metadata, so the file alone is enough).
    pub fn load(path: &Path) -> Result<Artifact> {
        let file = if path.is_dir() {
            path.join(TENSORS_FILE)
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::Artifact(format!("{}: {e}", file.display())))?;
        let md = meta.metadata().clone().unwrap_or_default();
        if md.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(Error::Artifact(format!(
                "{} is not a {FORMAT} file",
                file.display()
            )));
        }
        let ver: u32 = md
            .get("format_version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ver == 0 || ver > FORMAT_VERSION {
            return Err(Error::Artifact(format!(
                "unsupported format_version {ver} (this build reads ≤ {FORMAT_VERSION})"
            )));
        }
        let descriptor: Descriptor =
            serde_json::from_str(md.get("descriptor").map(String::as_str).unwrap_or("null"))
                .map_err(|e| Error::Artifact(format!("descriptor: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        Ok(Artifact {
            tensors: expand_bases(tensors.into_iter().collect(), &descriptor)?,
            descriptor,
        })
    }

    /// The tensors as the file stores them. A SparseGrad basis keeps only the columns its
    /// matrices' supports use (`ΔW = Σ v·P[:, r]·Q[:, c]ᵀ` never reads another column): on
    /// MiniLM-L6 a third to two thirds of each basis. Indices narrow to int16 when every
    /// dimension fits. [`Artifact::load`] restores both, so what is applied is unchanged.
    fn file_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = self.tensors.clone();
        let entries = &self.descriptor.entries;
        // Each index tensor is read once: the columns it uses of its basis (rows: P, cols: Q),
        // and whether it fits int16.
        let mut used: BTreeMap<(MlpKind, usize), std::collections::BTreeSet<u32>> = BTreeMap::new();
        for (name, entry) in entries {
            let DeltaEntry::Sparse { basis, .. } = entry else {
                continue;
            };
            let Some(t) = self.tensors.get(name).filter(|t| t.elem_count() > 0) else {
                continue;
            };
            if !name.ends_with(".sparse_indices") {
                continue;
            }
            let rc: Vec<Vec<i64>> = t.to_dtype(DType::I64)?.to_vec2()?;
            if let Some(kind) = basis {
                for (side, ids) in rc.iter().enumerate() {
                    let set = used.entry((*kind, side)).or_default();
                    set.extend(ids.iter().map(|&i| i as u32));
                }
            }
            if rc.iter().flatten().all(|&i| i <= i64::from(i16::MAX)) {
                out.insert(name.clone(), t.to_dtype(DType::I16)?);
            }
        }
        for (name, entry) in entries {
            let DeltaEntry::Basis { mlp_kind, side } = entry else {
                continue;
            };
            let Some(full) = self.tensors.get(name) else {
                continue;
            };
            let side = match side {
                BasisSide::P => 0,
                BasisSide::Q => 1,
            };
            let cols: Vec<u32> = used
                .remove(&(*mlp_kind, side))
                .unwrap_or_default()
                .into_iter()
                .collect();
            let width = full.dims2()?.1;
            if cols.len() < width && cols.last().is_none_or(|&c| (c as usize) < width) {
                let ix = Tensor::from_slice(&cols, cols.len(), full.device())?;
                out.insert(name.clone(), full.contiguous()?.index_select(&ix, 1)?);
                let map: Vec<i32> = cols.iter().map(|&c| c as i32).collect();
                out.insert(
                    format!("{name}{COLUMNS}"),
                    Tensor::from_vec(map, cols.len(), &Device::Cpu)?,
                );
            }
        }
        Ok(out)
    }

    /// Applies the delta to a base model loaded for the same task, in memory.
    pub fn apply(&self, model: &mut Model) -> Result<()> {
        let w = &mut model.weights;
        let (dev, dtype) = (w.device.clone(), w.dtype);
        let mut sparse: BTreeMap<String, Option<MlpKind>> = BTreeMap::new();
        let mut adds: Vec<(String, Tensor)> = Vec::new();
        for (name, entry) in &self.descriptor.entries {
            let t = self.tensors.get(name).ok_or_else(|| {
                Error::Artifact(format!("descriptor names `{name}` but the file lacks it"))
            })?;
            match entry {
                DeltaEntry::Dense { param } => {
                    let base = w.get(param)?;
                    if base.dims() != t.dims() {
                        return Err(Error::Artifact(format!(
                            "`{param}` has shape {:?} in the artifact but {:?} in the base model",
                            t.dims(),
                            base.dims()
                        )));
                    }
                    w.insert(
                        param.clone(),
                        Param::Frozen(t.to_device(&dev)?.to_dtype(dtype)?),
                    );
                }
                DeltaEntry::Sparse { param, basis } => {
                    sparse.insert(param.clone(), *basis);
                }
                DeltaEntry::Basis { .. } => {}
                DeltaEntry::Add { param } => adds.push((param.clone(), t.clone())),
                DeltaEntry::Lora { .. } => {}
            }
        }
        for (linear, (a, b, scale)) in self.lora_pairs()? {
            let wn = format!("{linear}.weight");
            let base = w.get(&wn)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
            if delta.dims() != base.dims() {
                return Err(Error::Artifact(format!(
                    "LoRA delta for `{linear}` does not fit its weight"
                )));
            }
            let merged = (base + delta)?.to_dtype(dtype)?.to_device(&dev)?;
            w.insert(wn, Param::Frozen(merged));
        }
        // Dense additions and sparse updates both add to the base weight: sum them in f32,
        // round once.
        let mut add_to: BTreeMap<String, Tensor> = BTreeMap::new();
        for (param, t) in adds {
            let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let e = match add_to.remove(&param) {
                Some(prev) => (prev + t)?,
                None => t,
            };
            add_to.insert(param, e);
        }
        let mut bases: BTreeMap<MlpKind, HostBasis> = BTreeMap::new();
        for (param, kind) in sparse {
            let base = w.get(&param)?;
            let (out, inp) = base.dims2()?;
            let (idx, vals) = self.sparse_entries(&param, out, inp)?;
            let d = match kind {
                None => expand_plain(out, inp, &idx, &vals, &Device::Cpu)?,
                Some(kind) => {
                    let b = match bases.entry(kind) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(self.basis(kind, out, inp)?)
                        }
                    };
                    b.expand(out, inp, &idx, &vals)?
                }
            };
            let e = match add_to.remove(&param) {
                Some(prev) => (prev + d)?,
                None => d,
            };
            add_to.insert(param, e);
        }
        for (param, d) in add_to {
            let base = w.get(&param)?;
            if base.dims() != d.dims() {
                return Err(Error::Artifact(format!(
                    "delta for `{param}` has shape {:?} but the weight {:?}",
                    d.dims(),
                    base.dims()
                )));
            }
            let merged = (base.to_dtype(DType::F32)?.to_device(&Device::Cpu)? + d)?
                .to_dtype(dtype)?
                .to_device(&dev)?;
            w.insert(param, Param::Frozen(merged));
        }
        Ok(())
    }

    /// Each LoRA-adapted linear's `(A, B, scale)`, both factors present.
    pub(crate) fn lora_pairs(&self) -> Result<BTreeMap<String, (Tensor, Tensor, f64)>> {
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>, f64)> = BTreeMap::new();
        for (name, entry) in &self.descriptor.entries {
            let DeltaEntry::Lora { linear, scale } = entry else {
                continue;
            };
            let t = self.tensors.get(name).ok_or_else(|| {
                Error::Artifact(format!("descriptor names `{name}` but the file lacks it"))
            })?;
            let e = pairs.entry(linear.clone()).or_insert((None, None, *scale));
            if name.ends_with("lora_A.weight") {
                e.0 = Some(t.clone());
            } else {
                e.1 = Some(t.clone());
            }
        }
        pairs
            .into_iter()
            .map(|(linear, (a, b, scale))| match (a, b) {
                (Some(a), Some(b)) => Ok((linear, (a, b, scale))),
                _ => Err(Error::Artifact(format!(
                    "LoRA pair for `{linear}` is incomplete"
                ))),
            })
            .collect()
    }

    /// A sparse entry's flat indices and values, checked against the weight's shape.
    pub fn sparse_entries(
        &self,
        param: &str,
        out: usize,
        inp: usize,
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let get = |suffix: &str| {
            self.tensors
                .get(&format!("{param}.{suffix}"))
                .ok_or_else(|| {
                    Error::Artifact(format!("sparse delta for `{param}` lacks `{suffix}`"))
                })
        };
        let rc = get("sparse_indices")?.to_dtype(DType::I64)?;
        let vals: Vec<f32> = get("sparse_values")?.to_dtype(DType::F32)?.to_vec1()?;
        let (two, k) = rc.dims2()?;
        if two != 2 || k != vals.len() {
            return Err(Error::Artifact(format!(
                "`{param}.sparse_indices` must be (2, {}) but is ({two}, {k})",
                vals.len()
            )));
        }
        let rc: Vec<Vec<i64>> = rc.to_vec2()?;
        let mut idx = Vec::with_capacity(k);
        for (&r, &c) in rc[0].iter().zip(&rc[1]) {
            if r < 0 || c < 0 || r as usize >= out || c as usize >= inp {
                return Err(Error::Artifact(format!(
                    "`{param}` has an index ({r}, {c}) outside its {out}×{inp} weight"
                )));
            }
            idx.push((r as usize * inp + c as usize) as u32);
        }
        Ok((idx, vals))
    }

    fn basis(&self, kind: MlpKind, out: usize, inp: usize) -> Result<HostBasis> {
        let get = |side| {
            let n = basis_tensor_name(kind, side);
            self.tensors
                .get(&n)
                .ok_or_else(|| Error::Artifact(format!("artifact lacks basis `{n}`")))
                .and_then(|t| Ok(t.to_dtype(DType::F32)?))
        };
        let (p, q) = (get(BasisSide::P)?, get(BasisSide::Q)?);
        if p.dims() != [out, out] || q.dims() != [inp, inp] {
            return Err(Error::Artifact(format!(
                "basis of `{}` does not fit a {out}×{inp} weight",
                kind.as_str()
            )));
        }
        HostBasis::new(Basis {
            p,
            q,
            eig_p: Vec::new(),
            eig_q: Vec::new(),
            samples: 0,
        })
    }
}

/// Restores compact bases to their full square shape (unused columns zero), drops the column
/// maps and widens int16 indices back to int32, so the rest of the crate sees one form
/// whatever the file's version.
fn expand_bases(
    mut tensors: BTreeMap<String, Tensor>,
    d: &Descriptor,
) -> Result<BTreeMap<String, Tensor>> {
    let maps: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with(COLUMNS))
        .cloned()
        .collect();
    for map_name in maps {
        let name = map_name.trim_end_matches(COLUMNS).to_string();
        if !matches!(d.entries.get(&name), Some(DeltaEntry::Basis { .. })) {
            return Err(Error::Artifact(format!(
                "`{map_name}` maps columns of `{name}`, which is not a basis"
            )));
        }
        let cols: Vec<i64> = tensors[&map_name].to_dtype(DType::I64)?.to_vec1()?;
        let stored = tensors
            .get(&name)
            .ok_or_else(|| Error::Artifact(format!("`{map_name}` without `{name}`")))?;
        let dtype = stored.dtype();
        let compact = stored.to_dtype(DType::F32)?;
        let (n, used) = compact.dims2()?;
        if used != cols.len() || cols.iter().any(|&c| c < 0 || c as usize >= n) {
            return Err(Error::Artifact(format!(
                "`{map_name}` does not fit the {n}×{used} basis `{name}`"
            )));
        }
        let src: Vec<Vec<f32>> = compact.to_vec2()?;
        let mut full = vec![0f32; n * n];
        for (r, row) in src.iter().enumerate() {
            for (j, &c) in cols.iter().enumerate() {
                full[r * n + c as usize] = row[j];
            }
        }
        // In the dtype it was trained and stored in (bf16 bases stay bf16).
        let full = Tensor::from_vec(full, (n, n), &Device::Cpu)?.to_dtype(dtype)?;
        tensors.insert(name, full);
        tensors.remove(&map_name);
    }
    for (name, t) in tensors.iter_mut() {
        if name.ends_with(".sparse_indices") && t.dtype() == DType::I16 {
            *t = t.to_dtype(DType::I32)?;
        }
    }
    Ok(tensors)
}

/// Writes `base + delta` as a Hugging Face-layout folder (`config.json`,
/// `model.safetensors`, tokenizer files). Checks the base model's identity first.
pub fn merge(base_dir: &Path, artifact: &Artifact, out: &Path, seed: u64) -> Result<()> {
    let d = &artifact.descriptor;
    let files = weight_files(base_dir)?;
    let sha = sha256_files(&files)?;
    if sha != d.base_model_sha256 {
        return Err(Error::Artifact(format!(
            "base model mismatch: the artifact was trained on sha256 {} but {} has {}",
            d.base_model_sha256,
            base_dir.display(),
            sha
        )));
    }
    let (arch, raw) = read_config(base_dir)?;
    if arch != d.arch {
        return Err(Error::Artifact(format!(
            "artifact is for {} but the base is {}",
            d.arch.as_str(),
            arch.as_str()
        )));
    }
    let (tensors, _, _) = read_tensors(base_dir, arch)?;
    let dtype = tensors
        .values()
        .next()
        .map(|t| t.dtype())
        .unwrap_or(DType::F32);
    let opts = crate::pretrained::LoadOptions {
        task: d.task.clone(),
        dtype,
        device: Device::Cpu,
        seed,
    };
    let mut report = Default::default();
    let mut model = crate::pretrained::build_model(arch, raw, tensors, &opts, &mut report)?;
    artifact.apply(&mut model)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cfg = model.merged_config(d.labels.as_ref().map(|l| l.names.as_slice()));
    write_json(&out.join("config.json"), &cfg)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(
        &model.weights.snapshot(),
        Some(meta),
        &out.join("model.safetensors"),
    )?;
    copy_tokenizer_files(base_dir, out)
}

/// What `sparsegrad inspect` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub format: String,
    pub format_version: u32,
    pub method: String,
    pub hyperparameters: serde_json::Value,
    pub arch: String,
    pub task: String,
    pub labels: Option<Vec<String>>,
    pub base_model: Option<String>,
    pub base_model_sha256: String,
    pub total_bytes: usize,
    pub roles: BTreeMap<String, RoleSummary>,
    pub sparse: Vec<SparseSummary>,
    pub tensors: Vec<TensorSummary>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RoleSummary {
    pub tensors: usize,
    pub elements: usize,
    pub bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct SparseSummary {
    pub param: String,
    pub entries: usize,
    /// `(out, in)` when the artifact's basis tells it.
    pub shape: Option<(usize, usize)>,
    pub density: Option<f64>,
    pub basis: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub role: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

fn role(e: &DeltaEntry) -> &'static str {
    match e {
        DeltaEntry::Dense { .. } => "dense",
        DeltaEntry::Lora { .. } => "lora",
        DeltaEntry::Sparse { .. } => "sparse",
        DeltaEntry::Basis { .. } => "basis",
        DeltaEntry::Add { .. } => "dense_add",
    }
}

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1048576.0 {
        format!("{:.2} MiB", b / 1048576.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

impl Artifact {
    pub fn summary(&self) -> Summary {
        let d = &self.descriptor;
        let mut roles: BTreeMap<String, RoleSummary> = BTreeMap::new();
        let mut tensors = Vec::new();
        let mut total = 0;
        // Sizes as the file stores them (compact bases, narrow indices).
        let stored = self.file_tensors().unwrap_or_else(|_| self.tensors.clone());
        for (name, t) in &stored {
            let listed = d.entries.get(name.trim_end_matches(COLUMNS));
            let r = listed.map(role).unwrap_or("unlisted");
            let bytes = t.elem_count() * t.dtype().size_in_bytes();
            total += bytes;
            let e = roles.entry(r.to_string()).or_default();
            e.tensors += 1;
            e.elements += t.elem_count();
            e.bytes += bytes;
            tensors.push(TensorSummary {
                name: name.clone(),
                role: r.into(),
                dtype: format!("{:?}", t.dtype()).to_lowercase(),
                shape: t.dims().to_vec(),
                bytes,
            });
        }
        let mut sparse = Vec::new();
        for (name, e) in &d.entries {
            let DeltaEntry::Sparse { param, basis } = e else {
                continue;
            };
            if !name.ends_with(".sparse_values") {
                continue;
            }
            let entries = self.tensors.get(name).map(|t| t.elem_count()).unwrap_or(0);
            let shape = basis.and_then(|k| {
                let p = self.tensors.get(&basis_tensor_name(k, BasisSide::P))?;
                let q = self.tensors.get(&basis_tensor_name(k, BasisSide::Q))?;
                Some((p.dim(0).ok()?, q.dim(0).ok()?))
            });
            sparse.push(SparseSummary {
                param: param.clone(),
                entries,
                shape,
                density: shape.map(|(o, i)| entries as f64 / (o * i) as f64),
                basis: basis.map(|k| k.as_str().to_string()),
            });
        }
        Summary {
            format: d.format.clone(),
            format_version: d.format_version,
            method: d.method.clone(),
            hyperparameters: d.hyperparameters.clone(),
            arch: d.arch.as_str().into(),
            task: d.task.name().into(),
            labels: d.labels.as_ref().map(|l| l.names.clone()),
            base_model: d.base_model.clone(),
            base_model_sha256: d.base_model_sha256.clone(),
            total_bytes: total,
            roles,
            sparse,
            tensors,
        }
    }
}

impl Summary {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} v{} · method {} · {} {}",
            self.format, self.format_version, self.method, self.arch, self.task
        );
        if let Some(l) = &self.labels {
            let _ = writeln!(s, "labels: {}", l.join(", "));
        }
        let _ = writeln!(
            s,
            "base model: {} (sha256 {})",
            self.base_model.as_deref().unwrap_or("?"),
            self.base_model_sha256
        );
        let _ = writeln!(s, "hyperparameters: {}", self.hyperparameters);
        let _ = writeln!(
            s,
            "\n{:<10} {:>8} {:>12} {:>12}",
            "role", "tensors", "elements", "size"
        );
        for (r, x) in &self.roles {
            let _ = writeln!(
                s,
                "{r:<10} {:>8} {:>12} {:>12}",
                x.tensors,
                x.elements,
                human(x.bytes)
            );
        }
        let _ = writeln!(
            s,
            "{:<10} {:>8} {:>12} {:>12}",
            "total",
            self.tensors.len(),
            "",
            human(self.total_bytes)
        );
        if !self.sparse.is_empty() {
            let _ = writeln!(s, "\nsparse matrices:");
            for m in &self.sparse {
                let shape = m
                    .shape
                    .map(|(o, i)| {
                        format!(
                            " of {o}×{i} ({:.3}%)",
                            100.0 * m.entries as f64 / (o * i) as f64
                        )
                    })
                    .unwrap_or_default();
                let basis = m
                    .basis
                    .as_deref()
                    .map(|b| format!(", basis {b}"))
                    .unwrap_or_else(|| ", original basis".into());
                let _ = writeln!(s, "  {}: {} entries{shape}{basis}", m.param, m.entries);
            }
        }
        let _ = writeln!(s, "\ntensors:");
        for t in &self.tensors {
            let _ = writeln!(
                s,
                "  {:<64} {:<6} {:<10} {:>9} {:?}",
                t.name,
                t.role,
                t.dtype,
                human(t.bytes),
                t.shape
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rotated 4×3 matrix whose support uses `P` columns {0, 2} and `Q` column {1}.
    fn artifact() -> Artifact {
        let kind = MlpKind::Intermediate;
        let (pn, qn) = (
            basis_tensor_name(kind, BasisSide::P),
            basis_tensor_name(kind, BasisSide::Q),
        );
        let p: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let q: Vec<f32> = (0..9).map(|i| (i as f32 * 0.61).cos()).collect();
        let w = "layer.0.intermediate.dense.weight".to_string();
        let mut tensors = BTreeMap::new();
        tensors.insert(
            pn.clone(),
            Tensor::from_vec(p, (4, 4), &Device::Cpu).unwrap(),
        );
        tensors.insert(
            qn.clone(),
            Tensor::from_vec(q, (3, 3), &Device::Cpu).unwrap(),
        );
        let rc: Vec<i32> = vec![0, 2, 1, 1];
        tensors.insert(
            format!("{w}.sparse_indices"),
            Tensor::from_vec(rc, (2, 2), &Device::Cpu).unwrap(),
        );
        tensors.insert(
            format!("{w}.sparse_values"),
            Tensor::from_vec(vec![0.5f32, -1.25], 2, &Device::Cpu).unwrap(),
        );
        let sparse = DeltaEntry::Sparse {
            param: w.clone(),
            basis: Some(kind),
        };
        let mut entries = BTreeMap::new();
        for (n, side) in [(pn, BasisSide::P), (qn, BasisSide::Q)] {
            entries.insert(
                n,
                DeltaEntry::Basis {
                    mlp_kind: kind,
                    side,
                },
            );
        }
        entries.insert(format!("{w}.sparse_indices"), sparse.clone());
        entries.insert(format!("{w}.sparse_values"), sparse);
        Artifact {
            descriptor: Descriptor {
                format: FORMAT.into(),
                format_version: FORMAT_VERSION,
                arch: Arch::Bert,
                task: Task::Regression,
                method: "sparsegrad".into(),
                hyperparameters: serde_json::json!({}),
                base_model_sha256: "x".into(),
                base_model: None,
                labels: None,
                entries,
                training: serde_json::json!({}),
            },
            tensors,
        }
    }

    #[test]
    fn bases_are_stored_in_the_columns_the_support_uses_and_expand_the_same() {
        let a = artifact();
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let raw =
            candle_core::safetensors::load(dir.path().join(TENSORS_FILE), &Device::Cpu).unwrap();
        let p = basis_tensor_name(MlpKind::Intermediate, BasisSide::P);
        let q = basis_tensor_name(MlpKind::Intermediate, BasisSide::Q);
        assert_eq!(raw[&p].dims(), [4, 2]);
        assert_eq!(raw[&q].dims(), [3, 1]);
        assert_eq!(
            raw[&format!("{p}{COLUMNS}")].to_vec1::<i32>().unwrap(),
            [0, 2]
        );
        let idx = "layer.0.intermediate.dense.weight.sparse_indices";
        assert_eq!(raw[idx].dtype(), DType::I16);

        let b = Artifact::load(dir.path()).unwrap();
        assert_eq!(b.tensors[idx].dtype(), DType::I32);
        assert!(!b.tensors.contains_key(&format!("{p}{COLUMNS}")));
        let w = "layer.0.intermediate.dense.weight";
        let expand = |x: &Artifact| {
            let (i, v) = x.sparse_entries(w, 4, 3).unwrap();
            x.basis(MlpKind::Intermediate, 4, 3)
                .unwrap()
                .expand(4, 3, &i, &v)
                .unwrap()
        };
        assert_eq!(crate::testing::max_abs_diff(&expand(&a), &expand(&b)), 0.0);
    }

    #[test]
    fn a_bf16_basis_stays_bf16_through_the_round_trip() {
        let mut a = artifact();
        for (name, e) in &a.descriptor.entries {
            if matches!(e, DeltaEntry::Basis { .. }) {
                let t = a.tensors[name].to_dtype(DType::BF16).unwrap();
                a.tensors.insert(name.clone(), t);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let b = Artifact::load(dir.path()).unwrap();
        let p = basis_tensor_name(MlpKind::Intermediate, BasisSide::P);
        assert_eq!(b.tensors[&p].dtype(), DType::BF16);
        let stored: usize = b
            .summary()
            .tensors
            .iter()
            .filter(|t| t.role == "basis")
            .map(|t| t.bytes)
            .sum();
        // P: 4×2, Q: 3×1 in bf16, and the two int32 column maps.
        assert_eq!(stored, (8 + 3) * 2 + (2 + 1) * 4);
    }

    #[test]
    fn a_version_1_file_with_full_bases_still_loads() {
        let a = artifact();
        let dir = tempfile::tempdir().unwrap();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("format_version".to_string(), "1".to_string());
        let mut d = a.descriptor.clone();
        d.format_version = 1;
        meta.insert("descriptor".to_string(), serde_json::to_string(&d).unwrap());
        let path = dir.path().join(TENSORS_FILE);
        crate::io::write_safetensors(&a.tensors, Some(meta), &path).unwrap();
        let b = Artifact::load(dir.path()).unwrap();
        for (k, t) in &a.tensors {
            assert_eq!(crate::testing::max_abs_diff(t, &b.tensors[k]), 0.0, "{k}");
        }
    }

    #[test]
    fn a_column_map_that_does_not_fit_is_refused() {
        let a = artifact();
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let path = dir.path().join(TENSORS_FILE);
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().clone();
        let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let p = basis_tensor_name(MlpKind::Intermediate, BasisSide::P);
        t.insert(
            format!("{p}{COLUMNS}"),
            Tensor::from_vec(vec![0i32, 9], 2, &Device::Cpu).unwrap(),
        );
        let t: BTreeMap<String, Tensor> = t.into_iter().collect();
        crate::io::write_safetensors(&t, md, &path).unwrap();
        let e = Artifact::load(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("does not fit"), "{e}");
    }
}
