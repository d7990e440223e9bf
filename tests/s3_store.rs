//! The S3 backend against a real S3 server (SeaweedFS on loopback): the store
//! contract every writable backend keeps, including atomic create-only puts.

mod support;

use isr::store::{self, contract::check_store_contract};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_keeps_the_store_contract() {
    let server = tokio::task::spawn_blocking(support::SeaweedFs::start)
        .await
        .unwrap();
    let open = |prefix: &str| {
        store::open(
            &server.store_url(prefix),
            &server.settings(),
            support::quick_retry(),
        )
        .unwrap()
    };
    let handle = open("contract/prefix");
    check_store_contract(&handle).await;
    // Another prefix in the same bucket is another store.
    assert!(
        !open("contract/other")
            .reader()
            .exists("parcels/p/parcel.toml")
            .await
            .unwrap()
    );
    assert!(
        handle
            .reader()
            .exists("parcels/p/parcel.toml")
            .await
            .unwrap()
    );
}
