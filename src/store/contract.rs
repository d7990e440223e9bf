//! The behaviour every writable, listable backend must have, as one checker
//! that tests run against each backend (memory, local, S3 on a real server).
//! Panics on the first violation; meant for tests only.

use bytes::Bytes;

use super::{PutOutcome, StoreHandle};

/// Exercises `store` (which must be empty under `chunks/`, `parcels/` and
/// `nothing/`): create-only puts, gets, exists, listing, deletes, sync, key
/// validation, and exactly one winner among concurrent creates of one key.
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
}
