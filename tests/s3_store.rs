//! The S3 backend against a real S3 server (SeaweedFS on loopback): the store
//! contract every writable backend keeps, including atomic create-only puts.

mod support;

use bytes::Bytes;
use isr::store::{self, PutOutcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_keeps_the_store_contract() {
    let server = tokio::task::spawn_blocking(support::SeaweedFs::start)
        .await
        .unwrap();
    let handle = store::open(
        &server.store_url("contract/prefix"),
        &server.settings(),
        support::quick_retry(),
    )
    .unwrap();
    let (reader, lister, writer) = (
        handle.reader(),
        handle.lister().unwrap(),
        handle.writer("test").unwrap(),
    );

    assert!(reader.get("chunks/ab/x").await.unwrap_err().is_not_found());
    assert!(!reader.exists("chunks/ab/x").await.unwrap());
    assert_eq!(
        writer
            .put_new("chunks/ab/x", Bytes::from_static(b"first"))
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        writer
            .put_new("chunks/ab/x", Bytes::from_static(b"second"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(
        reader.get("chunks/ab/x").await.unwrap(),
        Bytes::from_static(b"first")
    );
    assert!(reader.exists("chunks/ab/x").await.unwrap());

    writer
        .put_new("parcels/p/parcel.toml", Bytes::from_static(b"t"))
        .await
        .unwrap();
    writer
        .put_new(
            "parcels/p/versions/0000000001.manifest",
            Bytes::from_static(b"m"),
        )
        .await
        .unwrap();
    let mut listed = lister.list("parcels/").await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            "parcels/p/parcel.toml",
            "parcels/p/versions/0000000001.manifest"
        ]
    );
    assert!(lister.list("nothing/").await.unwrap().is_empty());

    // Another prefix in the same bucket is another store.
    let neighbour = store::open(
        &server.store_url("contract/other"),
        &server.settings(),
        support::quick_retry(),
    )
    .unwrap();
    assert!(!neighbour.reader().exists("chunks/ab/x").await.unwrap());

    // Eight concurrent create-only puts of one key: exactly one creates it.
    let puts = (0..8u8).map(|i| {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .put_new("parcels/p/lock", Bytes::from(vec![i; 100]))
                .await
                .unwrap()
        })
    });
    let created = futures::future::join_all(puts)
        .await
        .into_iter()
        .filter(|outcome| *outcome.as_ref().unwrap() == PutOutcome::Created)
        .count();
    assert_eq!(created, 1);

    writer.delete("chunks/ab/x").await.unwrap();
    writer.delete("chunks/ab/x").await.unwrap();
    assert!(!reader.exists("chunks/ab/x").await.unwrap());
    writer.sync().await.unwrap();
}
