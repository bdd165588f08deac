//! `sparsegrad fsck`: the object store checked against the database.
//!
//! The service writes objects in three namespaces and records each in a row: uploaded files
//! (`tenants/<t>/files/<id>`, a `files` row), models imported from GGUF
//! (`tenants/<t>/models/<id>/import_…/`, a `models` row naming the prefix) and what jobs store
//! (`jobs/<id>/attempt-<n>/…`, `job_artifacts` rows by key and `job_checkpoints` rows by
//! prefix). An object is written before its row, so a crash between the two leaves an
//! **orphan**; a row whose object was lost is **missing**; an artifact whose stored size or
//! sha256 differs from its row is **corrupt**. Anything else in the store (a tenant's own
//! model folders, other prefixes) is not the service's and is left alone.
//!
//! Objects of an attempt a worker holds right now, and objects younger than the grace period,
//! are **pending** (their row may be on its way), never orphans. `--fix` deletes orphans;
//! missing and corrupt rows are reported for an operator to decide on (a job's rows are its
//! history).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::db::inventory;
use crate::storage::{ObjectInfo, Storage};

#[derive(Clone, Debug)]
pub struct FsckOptions {
    /// Unrecorded objects younger than this are pending, not orphans.
    pub grace: Duration,
    /// Delete orphans.
    pub fix: bool,
    /// Read every artifact to check its sha256 (sizes are always checked).
    pub digests: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Orphan {
    pub key: String,
    pub bytes: u64,
    pub age_secs: i64,
    /// Deleted by `--fix`.
    pub removed: bool,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProblemKind {
    /// The object (or a required part of a prefix) is gone.
    Missing,
    /// The object's size or sha256 differs from the row's.
    Corrupt,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RowProblem {
    /// `files`, `job_artifacts`, `job_checkpoints` or `models`.
    pub table: &'static str,
    pub id: String,
    pub key: String,
    pub kind: ProblemKind,
    pub problem: String,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FsckReport {
    pub objects: usize,
    pub bytes: u64,
    pub rows: usize,
    /// Unrecorded objects in the grace period or under an attempt running now.
    pub pending: usize,
    pub orphans: Vec<Orphan>,
    /// Rows whose object is gone (`missing`) or differs (`corrupt`).
    pub rows_with_problems: Vec<RowProblem>,
}

impl FsckReport {
    /// Nothing left to fix: no orphan still stored, no row with a problem.
    pub fn clean(&self) -> bool {
        self.orphans.iter().all(|o| o.removed) && self.rows_with_problems.is_empty()
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{} objects ({} bytes) under the service's prefixes, {} rows naming objects, {} pending\n",
            self.objects, self.bytes, self.rows, self.pending
        );
        for o in &self.orphans {
            let done = if o.removed { " (removed)" } else { "" };
            s += &format!(
                "orphan  {}  {} bytes, {} s old{done}\n",
                o.key, o.bytes, o.age_secs
            );
        }
        for r in &self.rows_with_problems {
            let kind = match r.kind {
                ProblemKind::Missing => "missing",
                ProblemKind::Corrupt => "corrupt",
            };
            s += &format!("{kind}  {} {}  {}\n", r.table, r.id, r.key);
            s += &format!("        {}\n", r.problem);
        }
        if self.orphans.is_empty() && self.rows_with_problems.is_empty() {
            s += "no problems found\n";
        }
        s
    }
}

/// Which attempt of which job an object under `jobs/` belongs to.
fn attempt_of(key: &str) -> Option<(&str, i32)> {
    let mut parts = key.split('/');
    if parts.next()? != "jobs" {
        return None;
    }
    let job = parts.next()?;
    let n = parts.next()?.strip_prefix("attempt-")?.parse().ok()?;
    Some((job, n))
}

/// Whether the service writes (and records) objects at `key`.
fn managed(key: &str) -> bool {
    let p: Vec<&str> = key.split('/').collect();
    match p.as_slice() {
        ["jobs", ..] => true,
        ["tenants", _, "files", _] => true,
        ["tenants", _, "models", _, import, ..] => import.starts_with("import_"),
        _ => false,
    }
}

/// The prefix a row would name for `key`: a checkpoint's
/// (`jobs/<j>/attempt-<n>/checkpoints/step-<s>`) or an imported model's
/// (`tenants/<t>/models/<m>/import_…`); a hash lookup per object keeps the check linear.
fn owning_prefix(key: &str) -> Option<&str> {
    let segs: Vec<&str> = key.splitn(6, '/').collect();
    let owned = matches!(
        segs.as_slice(),
        ["jobs", _, _, "checkpoints", _, _] | ["tenants", _, "models", _, _, _]
    );
    owned.then(|| {
        let len = segs[..5].iter().map(|s| s.len() + 1).sum::<usize>() - 1;
        &key[..len]
    })
}

pub async fn fsck(db: &PgPool, st: &Storage, opts: &FsckOptions) -> anyhow::Result<FsckReport> {
    // Rows first, then the listing: an object recorded after the rows were read is at most
    // grace-period young, so it counts as pending, never as an orphan.
    let files = inventory::files(db).await?;
    let artifacts = inventory::artifacts(db).await?;
    let checkpoints = inventory::checkpoints(db).await?;
    let models = inventory::models(db).await?;
    let held: HashSet<(String, i32)> = inventory::held_attempts(db).await?.into_iter().collect();
    let mut listed: Vec<ObjectInfo> = st.list_meta("jobs").await?;
    listed.extend(
        st.list_meta("tenants")
            .await?
            .into_iter()
            .filter(|o| managed(&o.key)),
    );
    let by_key: HashMap<&str, &ObjectInfo> = listed.iter().map(|o| (o.key.as_str(), o)).collect();

    let mut report = FsckReport {
        objects: listed.len(),
        bytes: listed.iter().map(|o| o.size).sum(),
        rows: files.len() + artifacts.len() + checkpoints.len() + models.len(),
        ..Default::default()
    };
    let mut named: HashSet<&str> = HashSet::new();
    let problem = |table, id: &str, key: &str, kind, problem: String| RowProblem {
        table,
        id: id.to_string(),
        key: key.to_string(),
        kind,
        problem,
    };

    for f in &files {
        named.insert(&f.object_key);
        match by_key.get(f.object_key.as_str()) {
            None => report.rows_with_problems.push(problem(
                "files",
                &f.id,
                &f.object_key,
                ProblemKind::Missing,
                "no object at this key".into(),
            )),
            Some(o) if o.size != f.bytes as u64 => report.rows_with_problems.push(problem(
                "files",
                &f.id,
                &f.object_key,
                ProblemKind::Corrupt,
                format!("stored size {} differs from the row's {}", o.size, f.bytes),
            )),
            Some(_) => {}
        }
    }
    for a in &artifacts {
        named.insert(&a.object_key);
        let Some(o) = by_key.get(a.object_key.as_str()) else {
            report.rows_with_problems.push(problem(
                "job_artifacts",
                &a.id,
                &a.object_key,
                ProblemKind::Missing,
                "no object at this key".into(),
            ));
            continue;
        };
        if o.size != a.bytes as u64 {
            report.rows_with_problems.push(problem(
                "job_artifacts",
                &a.id,
                &a.object_key,
                ProblemKind::Corrupt,
                format!("stored size {} differs from the row's {}", o.size, a.bytes),
            ));
        } else if opts.digests {
            let (_, sha) = st.digest(&a.object_key).await?;
            if sha != a.sha256 {
                report.rows_with_problems.push(problem(
                    "job_artifacts",
                    &a.id,
                    &a.object_key,
                    ProblemKind::Corrupt,
                    format!("stored sha256 {sha} differs from the row's {}", a.sha256),
                ));
            }
        }
    }
    // Prefix rows: every object under them is named; a checkpoint needs its completion
    // marker, a model its config.json.
    let mut prefix_rows: Vec<(&'static str, &inventory::StoredPrefix, &str)> = Vec::new();
    prefix_rows.extend(
        checkpoints
            .iter()
            .map(|c| ("job_checkpoints", c, "complete")),
    );
    prefix_rows.extend(
        models
            .iter()
            .filter(|m| managed(&format!("{}/config.json", m.object_prefix)))
            .map(|m| ("models", m, "config.json")),
    );
    let prefixes: HashSet<&str> = prefix_rows
        .iter()
        .map(|(_, r, _)| r.object_prefix.as_str())
        .collect();
    for (table, row, needed) in &prefix_rows {
        let want = format!("{}/{needed}", row.object_prefix);
        if !by_key.contains_key(want.as_str()) {
            report.rows_with_problems.push(problem(
                table,
                &row.id,
                &row.object_prefix,
                ProblemKind::Missing,
                format!("no `{needed}` under this prefix"),
            ));
        }
    }

    let now = chrono::Utc::now();
    for o in &listed {
        let in_named_prefix = owning_prefix(&o.key).is_some_and(|p| prefixes.contains(p));
        if named.contains(o.key.as_str()) || in_named_prefix {
            continue;
        }
        let age = now.signed_duration_since(o.modified);
        let running = attempt_of(&o.key).is_some_and(|(j, n)| held.contains(&(j.to_string(), n)));
        if running || age.to_std().unwrap_or_default() < opts.grace {
            report.pending += 1;
            continue;
        }
        let removed = opts.fix && st.delete(&o.key).await.is_ok();
        report.orphans.push(Orphan {
            key: o.key.clone(),
            bytes: o.size,
            age_secs: age.num_seconds(),
            removed,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_services_own_namespaces_are_judged() {
        assert!(managed("jobs/job_1/attempt-2/artifact/delta/delta.json"));
        assert!(managed("tenants/t1/files/file_1"));
        assert!(managed("tenants/t1/models/m/import_ab/config.json"));
        assert!(!managed("tenants/t1/models/m/config.json"));
        assert!(!managed("tenants/t1/my-folder/x"));
        assert!(!managed("elsewhere/x"));
    }

    #[test]
    fn keys_name_their_attempt() {
        assert_eq!(
            attempt_of("jobs/job_1/attempt-12/checkpoints/step-4/complete"),
            Some(("job_1", 12))
        );
        assert_eq!(attempt_of("jobs/job_1/other"), None);
        assert_eq!(attempt_of("tenants/t/files/f"), None);
        assert_eq!(
            owning_prefix("jobs/j/attempt-1/checkpoints/step-4/x"),
            Some("jobs/j/attempt-1/checkpoints/step-4")
        );
        assert_eq!(
            owning_prefix("tenants/t/models/m/import_1/config.json"),
            Some("tenants/t/models/m/import_1")
        );
        assert_eq!(owning_prefix("jobs/j/attempt-1/artifact/delta/x"), None);
        assert_eq!(owning_prefix("jobs/j/attempt-1/checkpoints/step-4"), None);
    }
}
