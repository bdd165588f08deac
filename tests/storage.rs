//! Object storage through the one `Storage` handle: file://, memory:// and a real
//! S3-compatible server (moto), including multipart uploads, ranges, listing, deletion, and
//! a stopped server failing cleanly.

mod common;

use std::time::Duration;

use futures::TryStreamExt;

use sparsegrad_service::storage::{S3Settings, Storage, StorageError};

fn s3_settings(endpoint: &str) -> S3Settings {
    common::s3_test_settings(endpoint, 1, Duration::from_secs(2))
}

async fn exercise(st: &Storage) {
    st.put("a/one.txt", "hello".into()).await.unwrap();
    st.put("a/two.txt", "world!".into()).await.unwrap();
    st.put("b/three.txt", "x".into()).await.unwrap();
    assert_eq!(st.get("a/one.txt").await.unwrap(), "hello");
    assert_eq!(st.get_range("a/two.txt", 1..4).await.unwrap(), "orl");
    assert_eq!(st.size("a/two.txt").await.unwrap(), Some(6));
    assert_eq!(st.size("a/none").await.unwrap(), None);
    assert!(matches!(
        st.get("a/none").await,
        Err(StorageError::NotFound(_))
    ));
    assert_eq!(st.list("a").await.unwrap(), ["a/one.txt", "a/two.txt"]);

    // 20 MiB: three parts.
    let tmp = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    let f = tmp.path().join("big.bin");
    std::fs::write(&f, &big).unwrap();
    assert_eq!(
        st.put_file("c/big.bin", &f).await.unwrap(),
        big.len() as u64
    );
    let back = tmp.path().join("back.bin");
    st.download("c/big.bin", &back).await.unwrap();
    assert!(
        std::fs::read(&back).unwrap() == big,
        "multipart object differs"
    );
    let tail = st
        .get_range("c/big.bin", (20 << 20) - 3..20 << 20)
        .await
        .unwrap();
    assert_eq!(&tail[..], &big[big.len() - 3..]);
    // A range spanning parts, streamed.
    let mid: Vec<u8> = st
        .get_range_stream("c/big.bin", (7 << 20)..(17 << 20) + 5)
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .concat();
    assert!(
        mid == big[7 << 20..(17 << 20) + 5],
        "streamed range differs"
    );

    // A writer's object is invisible until finished; an aborted one never appears.
    let mut w = st.writer("d/streamed.bin").unwrap();
    for chunk in big.chunks(3 << 20) {
        w.write(chunk).await.unwrap();
    }
    assert_eq!(st.size("d/streamed.bin").await.unwrap(), None);
    assert_eq!(w.finish().await.unwrap(), big.len() as u64);
    assert!(st.get("d/streamed.bin").await.unwrap() == big);
    let mut w = st.writer("d/aborted.bin").unwrap();
    w.write(&big).await.unwrap();
    w.abort().await;
    assert_eq!(st.size("d/aborted.bin").await.unwrap(), None);
    st.delete_prefix("d").await.unwrap();

    assert_eq!(st.delete_prefix("a").await.unwrap(), 2);
    assert!(st.list("a").await.unwrap().is_empty());
    st.delete("a/one.txt").await.unwrap(); // deleting what is gone is fine
    st.check().await.unwrap();
}

#[tokio::test]
async fn memory_and_file_storage() {
    exercise(&Storage::from_url("memory://", &S3Settings::default()).unwrap()).await;
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("objects").display());
    exercise(&Storage::from_url(&url, &S3Settings::default()).unwrap()).await;
}

#[tokio::test]
async fn s3_storage_against_a_real_server() {
    let Some(endpoint) = common::s3_bucket("storage-test") else {
        return;
    };
    let st = Storage::from_url("s3://storage-test/some/prefix", &s3_settings(&endpoint)).unwrap();
    exercise(&st).await;
    // The prefix is honoured: the same bucket without it sees keys under it.
    let root = Storage::from_url("s3://storage-test", &s3_settings(&endpoint)).unwrap();
    st.put("k", "v".into()).await.unwrap();
    assert_eq!(root.get("some/prefix/k").await.unwrap(), "v");
}

#[tokio::test]
async fn a_stopped_server_fails_cleanly() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let st = Storage::from_url(
        "s3://nowhere",
        &s3_settings(&format!("http://127.0.0.1:{port}")),
    )
    .unwrap();
    let e = st.put("k", "v".into()).await.unwrap_err();
    assert!(matches!(e, StorageError::Store(_)), "{e}");
    assert!(st.check().await.is_err());
}

#[test]
fn bad_urls_and_missing_credentials_are_refused() {
    for (url, want) in [
        ("ftp://x", "use file:///dir"),
        ("file://relative/dir", "absolute path"),
        ("s3://", "no bucket"),
        ("s3://bucket", "access key"),
    ] {
        let e = Storage::from_url(url, &S3Settings::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{url}: {e}");
    }
    // Secrets never show in Debug output.
    let dbg = format!("{:?}", s3_settings("http://x"));
    assert!(!dbg.contains("secret_access_key: Some(\"test\")"));
    assert!(dbg.contains("REDACTED"), "{dbg}");
}
