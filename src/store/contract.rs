//! The behaviour every writable, listable backend must have, as one checker
//! that tests run against each backend (memory, local, S3 on a real server).
//! Panics on the first violation; meant for tests only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{PutOutcome, StoreHandle};

/// Whole seconds since the epoch (S3 HEAD answers have one-second precision).
fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
}

/// Exercises `store` (which must be empty under `chunks/`, `parcels/` and
/// `nothing/`): create-only puts, gets, exists, listing, deletes, sync, key
/// validation, exactly one winner among concurrent creates of one key,
/// last-modified times (`modified`, `list_modified`, `list_info`) and
/// `put_replace` (replaces atomically, creates when absent, sets the time).
pub async fn check_store_contract(store: &StoreHandle) {
    let reader = store.reader();
    let lister = store.lister().expect("a listable store");
    let writer = store.writer("contract test").expect("a writable store");

    assert!(reader.get("chunks/ab/x").await.unwrap_err().is_not_found());
    assert!(!reader.exists("chunks/ab/x").await.unwrap());
    let first = Bytes::from_static(b"first");
    assert_eq!(
        writer.put_new("chunks/ab/x", first.clone()).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        writer
            .put_new("chunks/ab/x", Bytes::from_static(b"second"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(reader.get("chunks/ab/x").await.unwrap(), first);
    assert!(reader.exists("chunks/ab/x").await.unwrap());

    writer
        .put_new("parcels/p/parcel.toml", Bytes::from_static(b"t"))
        .await
        .unwrap();
    writer
        .put_new("parcels/p/versions/0000000001.manifest", Bytes::new())
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
        .filter(|outcome| *outcome.as_ref().expect("put task") == PutOutcome::Created)
        .count();
    assert_eq!(
        created, 1,
        "exactly one of 8 concurrent create-only puts wins"
    );

    writer.delete("chunks/ab/x").await.unwrap();
    writer.delete("chunks/ab/x").await.unwrap();
    assert!(!reader.exists("chunks/ab/x").await.unwrap());
    writer.sync().await.unwrap();
    assert!(reader.get("../escape").await.is_err());

    // Last-modified times. File systems stamp with a coarse clock and S3 HEAD
    // answers in whole seconds, so compare whole seconds, one second early.
    let before = seconds(SystemTime::now()) - 1;
    assert_eq!(writer.modified("chunks/ab/x").await.unwrap(), None);
    writer
        .put_new("chunks/cd/y", Bytes::from_static(b"y1"))
        .await
        .unwrap();
    let created = writer
        .modified("chunks/cd/y")
        .await
        .unwrap()
        .expect("exists");
    assert!(seconds(created) >= before, "modified time is the put's");
    let listed = lister.list_modified("chunks/").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].0, "chunks/cd/y");
    assert_eq!(seconds(listed[0].1), seconds(created));
    let info = lister.list_info("chunks/").await.unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!((info[0].key.as_str(), info[0].size), ("chunks/cd/y", 2));
    assert!(lister.list_modified("nothing/").await.unwrap().is_empty());
    assert!(writer.modified("../escape").await.is_err());

    writer
        .put_replace("chunks/cd/y", Bytes::from_static(b"y2"))
        .await
        .unwrap();
    assert_eq!(
        reader.get("chunks/cd/y").await.unwrap(),
        Bytes::from_static(b"y2")
    );
    let replaced = writer
        .modified("chunks/cd/y")
        .await
        .unwrap()
        .expect("exists");
    assert!(seconds(replaced) >= seconds(created), "refresh never ages");
    writer
        .put_replace("chunks/ef/z", Bytes::from_static(b"z"))
        .await
        .unwrap();
    assert!(
        reader.exists("chunks/ef/z").await.unwrap(),
        "creates when absent"
    );
    assert!(writer.put_replace("a//b", Bytes::new()).await.is_err());

    // Concurrent replaces and reads: every read sees one whole object.
    let replaces = (0..8u8).map(|i| {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .put_replace("parcels/p/versions/oldest", Bytes::from(vec![i; 4096]))
                .await
                .unwrap()
        })
    });
    let reads = (0..8).map(|_| {
        let reader = reader.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            match reader.get("parcels/p/versions/oldest").await {
                Ok(bytes) => Some(bytes),
                Err(e) if e.is_not_found() => None,
                Err(e) => panic!("{e}"),
            }
        })
    });
    futures::future::join_all(replaces).await;
    for read in futures::future::join_all(reads).await {
        if let Some(bytes) = read.expect("read task") {
            assert_eq!(bytes.len(), 4096);
            assert!(bytes.iter().all(|&b| b == bytes[0]), "a torn replace");
        }
    }
    writer.delete("chunks/cd/y").await.unwrap();
    writer.delete("chunks/ef/z").await.unwrap();
}
