//! A server keeping an encrypted replica (end-to-end encryption, docs/security.md),
//! seen by a raw WebSocket client: CONFIG answers the replica's `encryption` only to an
//! OPEN that carried one (the latest version's key id, or `null` for a plaintext
//! replica) and never agrees to compression for it; a pull relays the stored version
//! as it is (BEGIN sealed, one SPAGE a page with no plaintext, SEAL before COMMIT); and
//! `--merge` on an encrypted replica is refused, nothing stored.

use serde_json::json;
use sqlferry::protocol::Frame;
use sqlferry::store::Store;
use tempfile::TempDir;

use super::TestServer;
use super::raw::{connect, end, next, open, open_frame, runtime, send};

#[test]
fn config_answers_encryption_and_a_pull_relays_the_sealed_version() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let store = Store::new(&server.data);
    let src = crate::sealed::marked_db(dir.path());
    let k = crate::sealed::key(7);
    let id = k.id().to_string();
    crate::sealed_store::push(&store, "acme/enc.db", &src, Some(&k), None).expect("sealed push");
    crate::sealed_store::push(&store, "acme/plain.db", &src, None, None).expect("plain push");
    let pages = crate::util::page_count(&src);

    runtime().block_on(async {
        let key = &server.admin_key;
        let opened = |op: &str, replica: &str, encryption: Option<&str>| {
            let mut o = json!({
                "protocol": 1, "op": op, "replica": replica, "version": "latest",
                "client_id": "raw@test", "compress": ["zstd"],
            });
            if let Some(e) = encryption {
                o["encryption"] = json!({ "key_id": e });
            }
            o
        };
        // Push and pull with the key: the replica's key id, no compression.
        for op in ["push", "pull"] {
            let mut ws = connect(&server, key).await;
            let c = open(&mut ws, opened(op, "acme/enc.db", Some(&id))).await;
            assert_eq!(c["encryption"], json!({ "key_id": id }), "{op}: {c}");
            assert!(c.get("compress").is_none(), "{op}: {c}");
        }
        // A plaintext replica: `null`; without a key in OPEN: no `encryption` at all.
        let mut ws = connect(&server, key).await;
        let c = open(&mut ws, opened("pull", "acme/plain.db", Some(&id))).await;
        assert_eq!(c["encryption"], serde_json::Value::Null, "{c}");
        assert!(c.as_object().expect("object").contains_key("encryption"));
        let mut ws = connect(&server, key).await;
        let c = open(&mut ws, opened("push", "acme/plain.db", None)).await;
        assert!(!c.as_object().expect("object").contains_key("encryption"));

        // A pull relays what the store keeps: sealed pages, then the seal, then COMMIT.
        let mut ws = connect(&server, key).await;
        open(&mut ws, opened("pull", "acme/enc.db", Some(&id))).await;
        let begin = Frame::decode(&next(&mut ws).await.expect("BEGIN")).expect("a frame");
        let Frame::Begin { flags, .. } = begin else {
            panic!("BEGIN expected, got {begin:?}");
        };
        assert_eq!(flags & 0x04, 0x04, "a sealed session");
        assert!(send(&mut ws, Frame::Ready { page_count: 0 }.to_bytes()).await);
        let (mut spages, mut sealed_at) = (0u32, None);
        loop {
            let frame = Frame::decode(&next(&mut ws).await.expect("a frame")).expect("decodes");
            match frame {
                Frame::SealedPage { sealed, .. } => {
                    assert_eq!(sealed.len(), 4096 + 28);
                    assert!(
                        !sealed
                            .windows(b"sqlferry-store-marker".len())
                            .any(|w| w == b"sqlferry-store-marker"),
                        "plaintext on the wire"
                    );
                    spages += 1;
                }
                Frame::Seal { .. } => sealed_at = Some(spages),
                Frame::Commit { page_count, .. } => {
                    assert_eq!(page_count, pages);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(spages, pages, "every page, sealed");
        assert_eq!(
            sealed_at,
            Some(pages),
            "SEAL after the last page, before COMMIT"
        );
        drop(ws);

        // `--merge` on an encrypted replica: refused, nothing stored.
        let mut ws = connect(&server, key).await;
        let mut o = opened("push", "acme/enc.db", Some(&id));
        o["base"] = json!(0);
        o["merge"] = json!({ "on_conflict": "refuse" });
        assert!(send(&mut ws, open_frame(&o)).await);
        match end(&mut ws).await {
            super::raw::End::Error(_, message, _) => {
                assert!(message.contains("cannot merge"), "{message}")
            }
            other => panic!("a refusal expected, got {other:?}"),
        }
    });
    let r = sqlferry::store::ReplicaPath::parse("acme/enc.db").expect("valid");
    assert_eq!(
        store.latest_number(&r).expect("latest"),
        1,
        "nothing stored"
    );
}
