//! The object layer (`sqlferry::store::object`) against a real SeaweedFS
//! (`seaweed`): create-if-absent raced from many tasks, whole, ranged and multipart
//! objects, and the errors a user sees for a wrong key or an endpoint nobody answers.

use std::sync::Arc;

use sqlferry::store::object::{Created, MULTIPART_ABOVE, Objects, S3Location, S3Options};

use crate::seaweed;

/// Of 16 tasks creating one key at once, each with its own content, exactly one
/// creates it, and the object holds that task's content; repeated on 5 keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_if_absent_raced_has_exactly_one_winner() {
    let objects = Arc::new(seaweed::shared().objects());
    for round in 0..5 {
        let key = format!("replicas/app/v/{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = (0..16u8)
            .map(|task| {
                let (objects, key, barrier) = (objects.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let created = objects
                        .put_if_absent(&key, vec![task; 100])
                        .await
                        .expect("a create either wins or finds the object");
                    (task, created)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (task, created) = t.await.unwrap();
            if created == Created::Created {
                winners.push(task);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = objects.get(&key).await.unwrap().expect("the object exists");
        assert_eq!(stored, vec![winners[0]; 100], "round {round}");
    }
    // A create of an existing key writes nothing.
    let before = objects.get("replicas/app/v/0").await.unwrap();
    assert_eq!(
        objects
            .put_if_absent("replicas/app/v/0", b"other".to_vec())
            .await
            .unwrap(),
        Created::AlreadyExists
    );
    assert_eq!(objects.get("replicas/app/v/0").await.unwrap(), before);
}

/// Put, get, ranged get, head and delete, a missing object, and an object above the
/// multipart threshold (uploaded in parts, read back whole and by range); the
/// requests counted are the requests made.
#[tokio::test]
async fn objects_written_are_read_back_whole_and_by_range() {
    let objects = seaweed::shared().objects();
    let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
    objects.put("packs/a.pack", data.clone()).await.unwrap();
    assert_eq!(objects.get("packs/a.pack").await.unwrap().unwrap(), data);
    assert_eq!(
        objects.get_range("packs/a.pack", 4000..4096).await.unwrap(),
        data[4000..4096]
    );
    assert_eq!(
        objects.head("packs/a.pack").await.unwrap(),
        Some(data.len() as u64)
    );
    // A range past the end is refused, never short bytes taken as the page.
    assert!(
        objects
            .get_range("packs/a.pack", 399_990..400_010)
            .await
            .is_err()
    );
    assert_eq!(objects.get("packs/missing").await.unwrap(), None);
    assert_eq!(objects.head("packs/missing").await.unwrap(), None);
    let missing_range = objects.get_range("packs/missing", 0..10).await.unwrap_err();
    assert!(
        missing_range.to_string().contains("packs/missing"),
        "{missing_range}"
    );
    objects.delete("packs/a.pack").await.unwrap();
    assert_eq!(objects.head("packs/a.pack").await.unwrap(), None);
    objects.delete("packs/a.pack").await.unwrap();

    // Above the threshold: 4 parts of 16 MiB and one of 1 KiB.
    let before = objects.requests();
    let big: Vec<u8> = (0..MULTIPART_ABOVE + 1024)
        .map(|i| (i % 251) as u8)
        .collect();
    objects.put("packs/big.pack", big.clone()).await.unwrap();
    let after = objects.requests();
    assert_eq!(
        after.put - before.put,
        1 + 5 + 1,
        "start, 5 parts, complete"
    );
    assert_eq!(
        objects.head("packs/big.pack").await.unwrap(),
        Some(big.len() as u64)
    );
    let at = MULTIPART_ABOVE as u64 - 10;
    assert_eq!(
        objects
            .get_range("packs/big.pack", at..at + 100)
            .await
            .unwrap(),
        big[at as usize..at as usize + 100]
    );
    assert!(objects.get("packs/big.pack").await.unwrap().unwrap() == big);
    assert_eq!(objects.requests().list, 0, "nothing lists");
}

/// A wrong secret key: a clear error naming the bucket and the endpoint and saying
/// which variables to check, never the secret; nothing written.
#[tokio::test]
async fn a_wrong_key_is_refused_clearly_and_the_secret_never_shown() {
    let server = seaweed::shared();
    let bucket = server.bucket();
    let good = Objects::open(S3Location::parse(&bucket).unwrap(), &server.options()).unwrap();
    good.put("present", b"x".to_vec()).await.unwrap();
    let wrong_secret = "this-is-the-wrong-secret-4711";
    let options = S3Options {
        secret_access_key: Some(wrong_secret.into()),
        ..server.options()
    };
    let bad = Objects::open(S3Location::parse(&bucket).unwrap(), &options).unwrap();
    for e in [
        bad.put("k", b"x".to_vec()).await.unwrap_err(),
        bad.put_if_absent("k", b"x".to_vec()).await.unwrap_err(),
        bad.get("present").await.unwrap_err(),
    ] {
        let text = e.to_string();
        assert!(text.contains("refused the credentials"), "{text}");
        assert!(text.contains(&bucket), "{text}");
        assert!(text.contains(&server.endpoint), "{text}");
        assert!(text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
        assert!(!text.contains(wrong_secret), "{text}");
        assert!(!text.contains(seaweed::SECRET_KEY), "{text}");
        assert!(!format!("{e:?}").contains(wrong_secret), "{e:?}");
    }
    assert_eq!(good.get("k").await.unwrap(), None, "nothing was written");
}

/// An endpoint nothing listens on: a clear error within seconds, naming the endpoint
/// and saying what to check.
#[tokio::test]
async fn an_unreachable_endpoint_is_reported_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let options = S3Options {
        endpoint: Some(endpoint.clone()),
        access_key_id: Some("id".into()),
        secret_access_key: Some("secret".into()),
        ..S3Options::default()
    };
    let objects =
        Objects::open(S3Location::parse("s3://nobody-home/p").unwrap(), &options).unwrap();
    let started = std::time::Instant::now();
    let e = objects
        .put_if_absent("v/1", b"x".to_vec())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("cannot reach the object storage"), "{text}");
    assert!(text.contains(&endpoint), "{text}");
    assert!(text.contains("s3://nobody-home/p"), "{text}");
    assert!(text.contains("--s3-endpoint"), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "gave up after {:?}",
        started.elapsed()
    );
}
