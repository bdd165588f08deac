//! `sparsegrad fsck` against a real database and store: a consistent store is clean; an
//! object no row names is an orphan once past the grace period (pending before, and while its
//! attempt runs) and `--fix` deletes it; a row whose object is gone, or whose bytes differ,
//! is reported and never "fixed" away.

use std::time::Duration;

use sparsegrad_service::fsck::{fsck, FsckOptions};
use sparsegrad_service::storage::{S3Settings, Storage};
use sqlx::PgPool;

fn opts(grace: u64, fix: bool) -> FsckOptions {
    FsckOptions {
        grace: Duration::from_secs(grace),
        fix,
        digests: true,
    }
}

async fn setup(db: &PgPool, st: &Storage) {
    sqlx::query("insert into tenants (id, name) values ('t1', 't1')")
        .execute(db)
        .await
        .unwrap();
    st.put("tenants/t1/files/file_1", "abc\n".into())
        .await
        .unwrap();
    sqlx::query(
        "insert into files (id, tenant_id, filename, purpose, bytes, format, task, rows, object_key)
         values ('file_1', 't1', 'a.jsonl', 'fine-tune', 4, 'jsonl', 'classification', 1,
                 'tenants/t1/files/file_1')",
    )
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "insert into jobs (id, tenant_id, status, spec, attempt) values ('job_1', 't1', 'succeeded', '{}', 2)",
    )
    .execute(db)
    .await
    .unwrap();
    let delta = b"delta bytes";
    st.put(
        "jobs/job_1/attempt-2/artifact/delta/delta.safetensors",
        delta.to_vec().into(),
    )
    .await
    .unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(delta));
    sqlx::query(
        "insert into job_artifacts (id, job_id, kind, name, object_key, bytes, sha256)
         values ('art_1', 'job_1', 'delta', 'delta.safetensors',
                 'jobs/job_1/attempt-2/artifact/delta/delta.safetensors', $1, $2)",
    )
    .bind(delta.len() as i64)
    .bind(sha)
    .execute(db)
    .await
    .unwrap();
    for name in ["state.safetensors", "complete"] {
        st.put(
            &format!("jobs/job_1/attempt-1/checkpoints/step-4/{name}"),
            "x".into(),
        )
        .await
        .unwrap();
    }
    sqlx::query(
        "insert into job_checkpoints (id, job_id, attempt, step, object_prefix, bytes)
         values ('ckpt_1', 'job_1', 1, 4, 'jobs/job_1/attempt-1/checkpoints/step-4', 1)",
    )
    .execute(db)
    .await
    .unwrap();
    // Not the service's: a tenant's own model folder is never judged.
    st.put("tenants/t1/my-models/m/config.json", "{}".into())
        .await
        .unwrap();
}

fn store(dir: &std::path::Path) -> Storage {
    Storage::from_url(&format!("file://{}", dir.display()), &S3Settings::default()).unwrap()
}

#[sqlx::test(migrations = "./migrations")]
async fn a_consistent_store_is_clean(db: PgPool) {
    let tmp = tempfile::tempdir().unwrap();
    let st = store(tmp.path());
    setup(&db, &st).await;
    let r = fsck(&db, &st, &opts(0, false)).await.unwrap();
    assert!(r.clean(), "{}", r.to_text());
    assert_eq!((r.objects, r.rows, r.pending), (4, 3, 0), "{r:?}");
    assert!(r.to_text().contains("no problems found"));
}

#[sqlx::test(migrations = "./migrations")]
async fn orphans_are_found_after_the_grace_period_and_fixed(db: PgPool) {
    let tmp = tempfile::tempdir().unwrap();
    let st = store(tmp.path());
    setup(&db, &st).await;
    // A losing attempt's artifact, a checkpoint uploaded but never recorded, an upload whose
    // row never came.
    for k in [
        "jobs/job_1/attempt-1/artifact/delta/delta.safetensors",
        "jobs/job_1/attempt-2/checkpoints/step-8/complete",
        "tenants/t1/files/file_lost",
    ] {
        st.put(k, "zombie".into()).await.unwrap();
    }
    // Young: pending, not orphans (their rows may be on the way).
    let r = fsck(&db, &st, &opts(3600, true)).await.unwrap();
    assert!(r.clean() && r.orphans.is_empty(), "{}", r.to_text());
    assert_eq!(r.pending, 3);
    // Past the grace period, without --fix: reported, kept, not clean.
    let r = fsck(&db, &st, &opts(0, false)).await.unwrap();
    assert_eq!(r.orphans.len(), 3, "{}", r.to_text());
    assert!(!r.clean());
    assert!(st
        .size("tenants/t1/files/file_lost")
        .await
        .unwrap()
        .is_some());
    // --fix deletes exactly them.
    let r = fsck(&db, &st, &opts(0, true)).await.unwrap();
    assert!(
        r.orphans.iter().all(|o| o.removed) && r.clean(),
        "{}",
        r.to_text()
    );
    let r = fsck(&db, &st, &opts(0, false)).await.unwrap();
    assert!(r.clean() && r.orphans.is_empty(), "{}", r.to_text());
    assert_eq!(r.objects, 4);
    assert!(st
        .size("tenants/t1/my-models/m/config.json")
        .await
        .unwrap()
        .is_some());
}

#[sqlx::test(migrations = "./migrations")]
async fn an_attempt_that_is_running_is_never_collected(db: PgPool) {
    let tmp = tempfile::tempdir().unwrap();
    let st = store(tmp.path());
    setup(&db, &st).await;
    sqlx::query(
        "insert into jobs (id, tenant_id, status, spec, attempt, worker_id, lease_expires_at)
         values ('job_2', 't1', 'running', '{}', 3, 'w', now() + interval '1 minute')",
    )
    .execute(&db)
    .await
    .unwrap();
    st.put(
        "jobs/job_2/attempt-3/artifact/delta/delta.json",
        "{}".into(),
    )
    .await
    .unwrap();
    st.put(
        "jobs/job_2/attempt-2/artifact/delta/delta.json",
        "{}".into(),
    )
    .await
    .unwrap();
    let r = fsck(&db, &st, &opts(0, true)).await.unwrap();
    assert_eq!(r.pending, 1, "{}", r.to_text());
    assert_eq!(r.orphans.len(), 1);
    assert_eq!(
        r.orphans[0].key,
        "jobs/job_2/attempt-2/artifact/delta/delta.json"
    );
    assert!(st
        .size("jobs/job_2/attempt-3/artifact/delta/delta.json")
        .await
        .unwrap()
        .is_some());
}

#[sqlx::test(migrations = "./migrations")]
async fn missing_and_corrupt_rows_are_reported_not_deleted(db: PgPool) {
    let tmp = tempfile::tempdir().unwrap();
    let st = store(tmp.path());
    setup(&db, &st).await;
    st.delete("tenants/t1/files/file_1").await.unwrap();
    st.delete("jobs/job_1/attempt-1/checkpoints/step-4/complete")
        .await
        .unwrap();
    // Same size, other bytes: only the digest tells.
    st.put(
        "jobs/job_1/attempt-2/artifact/delta/delta.safetensors",
        "DELTA BYTES".into(),
    )
    .await
    .unwrap();
    let r = fsck(&db, &st, &opts(0, true)).await.unwrap();
    assert!(!r.clean());
    let mut got: Vec<(&str, &str)> = r
        .rows_with_problems
        .iter()
        .map(|p| (p.table, p.id.as_str()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("files", "file_1"),
            ("job_artifacts", "art_1"),
            ("job_checkpoints", "ckpt_1")
        ],
        "{}",
        r.to_text()
    );
    assert!(r.to_text().contains("sha256"), "{}", r.to_text());
    let (rows,): (i64,) = sqlx::query_as("select count(*) from files")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rows, 1, "a row is history: never deleted by fsck");
    // Sizes only: the same-size corruption is not seen.
    let sizes = FsckOptions {
        digests: false,
        ..opts(0, false)
    };
    let r = fsck(&db, &st, &sizes).await.unwrap();
    assert_eq!(r.rows_with_problems.len(), 2, "{}", r.to_text());
}
