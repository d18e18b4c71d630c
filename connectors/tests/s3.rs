//! The S3 store against a real S3-compatible server (`infra/s3-server.sh`: s3s-fs on
//! 127.0.0.1). `infra/test.sh` starts it and exports the SDK's standard variables
//! (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`). A server
//! that cannot be reached fails the tests.

use bytes::Bytes;
use medbatch_connectors::s3::{S3Store, MULTIPART_THRESHOLD};
use medbatch_connectors::store::{ObjectStore, StoreError};
use std::sync::Arc;

fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL: run the tests through `bash infra/test.sh`")
}

/// A fresh bucket for one test, and a store under a prefix in it.
async fn store(test: &str) -> S3Store {
    let bucket = format!("medbatch-{test}-{}", std::process::id());
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    let client = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
    client
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket at {}: {e:?}", endpoint()));
    S3Store::connect(&format!("s3://{bucket}/out/run"), None).await.unwrap()
}

/// Empties and deletes the test's bucket.
async fn drop_bucket(s: &S3Store) {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    let client = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
    let bucket = &s.location_parts().bucket;
    let mut pages = client.list_objects_v2().bucket(bucket).into_paginator().send();
    while let Some(page) = pages.next().await {
        for o in page.unwrap().contents() {
            client.delete_object().bucket(bucket).key(o.key().unwrap()).send().await.unwrap();
        }
    }
    client.delete_bucket().bucket(bucket).send().await.unwrap();
}

#[tokio::test]
async fn objects_round_trip_and_list_sorted_across_pages() {
    let s = store("roundtrip").await;
    assert_eq!(s.location().split('/').next_back(), Some("run"));
    assert_eq!(s.get("missing.json").await.unwrap(), None);
    assert!(!s.exists("missing.json").await.unwrap());
    s.put("_runs/r/plan.json", Bytes::from_static(b"{\"a\":1}")).await.unwrap();
    assert_eq!(s.get("_runs/r/plan.json").await.unwrap().unwrap(), Bytes::from_static(b"{\"a\":1}"));
    assert!(s.exists("_runs/r/plan.json").await.unwrap());
    // Replacing is allowed with put.
    s.put("_runs/r/plan.json", Bytes::from_static(b"{\"a\":2}")).await.unwrap();
    assert_eq!(&s.get("_runs/r/plan.json").await.unwrap().unwrap()[..], b"{\"a\":2}");
    // More keys than one listing page (1000) holds.
    let keys: Vec<String> = (0..1100).map(|i| format!("_runs/r/done/{i:05}.json")).collect();
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for chunk in keys.chunks(100) {
        let (s, chunk) = (s.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for k in chunk {
                s.put(&k, Bytes::from_static(b"{}")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let listed = s.list("_runs/r/done/").await.unwrap();
    assert_eq!(listed, keys);
    assert_eq!(s.list("_runs/r/").await.unwrap().len(), 1101);
    assert!(matches!(s.put("../x", Bytes::new()).await, Err(StoreError::InvalidKey(_))));
    drop_bucket(&s).await;
}

#[tokio::test]
async fn conditional_writes_only_write_what_is_absent() {
    let s = store("conditional").await;
    assert!(s.put_if_absent("_runs/r/done/j.json", Bytes::from_static(b"first")).await.unwrap());
    assert!(!s.put_if_absent("_runs/r/done/j.json", Bytes::from_static(b"second")).await.unwrap());
    assert_eq!(&s.get("_runs/r/done/j.json").await.unwrap().unwrap()[..], b"first");
    // Writers one after another: only the first writes. (s3s-fs does not serialize
    // conditional writes that arrive at the same instant, as S3 does, so racing writers
    // are not tested here.)
    let mut won = Vec::new();
    for i in 0..4u8 {
        won.push(s.put_if_absent("_runs/r/_SUCCESS", Bytes::from(vec![i])).await.unwrap());
    }
    assert_eq!(won, [true, false, false, false]);
    assert_eq!(&s.get("_runs/r/_SUCCESS").await.unwrap().unwrap()[..], [0]);
    drop_bucket(&s).await;
}

#[tokio::test]
async fn large_objects_go_up_in_parts() {
    let s = store("multipart").await;
    let big: Vec<u8> = (0..MULTIPART_THRESHOLD + (3 << 20)).map(|i| (i * 31 % 251) as u8).collect();
    s.put("lab_results/run_id=r/part-j.parquet", Bytes::from(big.clone())).await.unwrap();
    let back = s.get("lab_results/run_id=r/part-j.parquet").await.unwrap().unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back[..] == big[..]);
    drop_bucket(&s).await;
}

#[tokio::test]
async fn wrong_credentials_are_refused_and_errors_name_the_key_but_no_secret() {
    let s = store("creds").await;
    // The server checks signatures: a client with a wrong secret is refused.
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .credentials_provider(aws_sdk_s3::config::Credentials::new("medbatch-test", "wrong-secret", None, None, "test"))
        .load()
        .await;
    let client = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());
    let denied = client.put_object().bucket(&s.location_parts().bucket).key("x").body(Bytes::new().into()).send().await;
    assert!(denied.is_err(), "the server accepted a wrong signature");
    // Through the store: a bucket that does not exist is named in the error, the secret is not.
    let absent = format!("s3://medbatch-absent-{}/p", std::process::id());
    let missing = S3Store::connect(&absent, None).await.unwrap();
    let e = missing.list("_runs/").await.unwrap_err().to_string();
    assert!(e.contains(&format!("{absent}/_runs/")), "{e}");
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    assert!(!secret.is_empty() && !e.contains(&secret), "{e}");
    drop_bucket(&s).await;
}

/// The bytes of a test object: a pattern that differs at every offset within 251 bytes.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_listed_and_streamed_with_ranged_reads() {
    use medbatch_connectors::inputs::InputSource;
    use medbatch_connectors::s3::{client, S3Location};
    use medbatch_connectors::s3_input::{list_objects, S3Reader, SKIP_THROUGH_BYTES};
    use std::io::{Read, Seek, SeekFrom};

    let s = store("inputs").await;
    let bucket = s.location_parts().bucket.clone();
    let data = pattern(5 << 20);
    // Keys relative to the store's prefix `out/run`.
    s.put("archive/big.bin", Bytes::from(data.clone())).await.unwrap();
    s.put("archive/sub/a.txt", Bytes::from_static(b"a")).await.unwrap();
    s.put("archive/.hidden/x.txt", Bytes::from_static(b"x")).await.unwrap();
    s.put("archive-other/y.txt", Bytes::from_static(b"y")).await.unwrap();

    // A prefix is a folder (hidden entries and sibling prefixes left out); a key is itself.
    let source = InputSource::with_s3(None);
    let folder = format!("s3://{bucket}/out/run/archive");
    let (src, f) = (source.clone(), folder.clone());
    let found = tokio::task::spawn_blocking(move || src.expand(&f)).await.unwrap().unwrap();
    let uris: Vec<_> = found.iter().map(|f| f.uri.clone()).collect();
    assert_eq!(uris, vec![format!("{folder}/big.bin"), format!("{folder}/sub/a.txt")]);
    assert_eq!(found[0].size, data.len() as u64);
    assert!(found[0].etag.is_some());
    let (src, key) = (source.clone(), format!("{folder}/sub/a.txt"));
    let one = tokio::task::spawn_blocking(move || src.expand(&key)).await.unwrap().unwrap();
    assert_eq!(one.len(), 1);
    let (src, missing) = (source.clone(), format!("s3://{bucket}/nothing-here"));
    let none = tokio::task::spawn_blocking(move || src.expand(&missing)).await.unwrap().unwrap();
    assert!(none.is_empty());

    // Sequential reads in odd sizes come from one request; a short skip forward reads
    // through it; a seek back or far ahead starts a new ranged request.
    let c = client(None).await;
    let loc = S3Location::parse(&format!("{folder}/big.bin")).unwrap();
    let object = list_objects(&c, &loc).await.unwrap().remove(0);
    let handle = tokio::runtime::Handle::current();
    let (d, obj, h) = (data.clone(), object.clone(), handle.clone());
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || {
        let mut r = S3Reader::new(c2.clone(), h.clone(), obj.clone());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_001];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == d, "sequential read differs");
        assert_eq!(r.requests(), 1);

        let mut r = S3Reader::new(c2, h, obj);
        let mut small = [0u8; 1000];
        r.read_exact(&mut small).unwrap();
        assert_eq!(&small[..], &d[..1000]);
        r.seek(SeekFrom::Current(SKIP_THROUGH_BYTES as i64 / 2)).unwrap();
        r.read_exact(&mut small).unwrap();
        let at = 2000 + SKIP_THROUGH_BYTES as usize / 2;
        assert_eq!(&small[..], &d[at - 1000..at]);
        assert_eq!(r.requests(), 1, "a short skip reads through the open stream");
        r.seek(SeekFrom::End(-1000)).unwrap();
        r.read_exact(&mut small).unwrap();
        assert_eq!(&small[..], &d[d.len() - 1000..]);
        assert_eq!(r.read(&mut small).unwrap(), 0, "end of object");
        r.seek(SeekFrom::Start(10)).unwrap();
        r.read_exact(&mut small).unwrap();
        assert_eq!(&small[..], &d[10..1010]);
        assert_eq!(r.requests(), 3, "far and backward seeks are new ranged requests");
    })
    .await
    .unwrap();

    // The object replaced after listing: reading with the listed ETag fails, naming the
    // object and why.
    s.put("archive/big.bin", Bytes::from(pattern(1000))).await.unwrap();
    let (src, uri, etag) = (source.clone(), object.uri(), object.etag.clone());
    let err = tokio::task::spawn_blocking(move || {
        let mut r = src.open(&uri, 5 << 20, etag.as_deref()).unwrap();
        let mut b = [0u8; 10];
        r.read(&mut b).unwrap_err()
    })
    .await
    .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("big.bin") && msg.contains("changed since"), "{msg}");
    drop_bucket(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slide_is_read_from_s3_a_range_at_a_time() {
    use medbatch_connectors::s3::{client, S3Location};
    use medbatch_connectors::s3_input::{list_objects, S3RangeSource};
    use medbatch_formats::wsi::{FileSource, Metered, Slide, WsiLimits};

    // Synthetic pyramids written by the whole-slide oracle (tifffile).
    let dir = tempfile::tempdir().unwrap();
    let python = std::env::var("MEDBATCH_PYTHON").expect("MEDBATCH_PYTHON: run the tests through `bash infra/test.sh`");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../formats/tests/support/wsi_oracle.py");
    let o = std::process::Command::new(python).arg(script).arg("make").arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let local = dir.path().join("deflate.tiff");
    let bytes = std::fs::read(&local).unwrap();

    let s = store("wsi").await;
    let bucket = s.location_parts().bucket.clone();
    s.put("slides/deflate.tiff", Bytes::from(bytes.clone())).await.unwrap();
    let c = client(None).await;
    let loc = S3Location::parse(&format!("s3://{bucket}/out/run/slides/deflate.tiff")).unwrap();
    let object = list_objects(&c, &loc).await.unwrap().remove(0);
    let handle = tokio::runtime::Handle::current();
    let (c2, obj, size) = (c.clone(), object.clone(), bytes.len() as u64);
    tokio::task::spawn_blocking(move || {
        let limits = WsiLimits::default();
        let remote = Slide::open(Metered::new(S3RangeSource::new(c2, handle, obj)), &limits).unwrap();
        let here = Slide::open(FileSource::open(&local).unwrap(), &limits).unwrap();
        assert_eq!(remote.info(), here.info(), "the same description from S3 as from the file");
        let (header_requests, header_bytes) = remote.source().counts();
        assert!(header_requests <= 4, "{header_requests} requests for the header");
        assert_eq!(header_bytes, remote.info().header_bytes_read);
        for (level, col, row) in [(0, 0, 0), (0, 3, 2), (1, 1, 1), (2, 0, 0)] {
            assert_eq!(remote.read_tile(level, col, row).unwrap(), here.read_tile(level, col, row).unwrap());
        }
        let (requests, read) = remote.source().counts();
        assert_eq!(requests, header_requests + 4, "one ranged GET a tile");
        // Four of the slide's seventeen tiles.
        let tiles = read - header_bytes;
        assert!(tiles < size / 3, "{tiles} bytes of tiles read of {size}");
    })
    .await
    .unwrap();

    // The same through the input source planning and workers use, for the object and for
    // the local file.
    let source = medbatch_connectors::inputs::InputSource::with_s3(None);
    let (uri, etag, local_path) = (object.uri(), object.etag.clone(), dir.path().join("deflate.tiff"));
    let size = bytes.len() as u64;
    tokio::task::spawn_blocking(move || {
        let remote = source.open_range(&uri, size, etag.as_deref()).unwrap();
        let local = source.open_range(local_path.to_str().unwrap(), size, None).unwrap();
        let (a, b) =
            (Slide::open(remote, &WsiLimits::default()).unwrap(), Slide::open(local, &WsiLimits::default()).unwrap());
        assert_eq!(a.info().header_digest, b.info().header_digest);
        assert_eq!(a.read_tile(0, 2, 1).unwrap(), b.read_tile(0, 2, 1).unwrap());
        assert_ne!(
            a.info().identity(etag.as_deref(), size),
            b.info().identity(None, size),
            "the ETag is part of the identity"
        );
    })
    .await
    .unwrap();

    // The slide replaced after planning: a tile read fails, naming the object and why.
    let (c2, obj) = (c.clone(), object.clone());
    let handle = tokio::runtime::Handle::current();
    let remote = tokio::task::spawn_blocking(move || {
        Slide::open(S3RangeSource::new(c2, handle, obj), &WsiLimits::default()).unwrap()
    })
    .await
    .unwrap();
    s.put("slides/deflate.tiff", Bytes::from(bytes[..bytes.len() - 10].to_vec())).await.unwrap();
    let err = tokio::task::spawn_blocking(move || remote.read_tile(0, 1, 1).unwrap_err()).await.unwrap();
    let msg = err.to_string();
    assert!(msg.contains("deflate.tiff") && msg.contains("changed since"), "{msg}");
    drop_bucket(&s).await;
}
