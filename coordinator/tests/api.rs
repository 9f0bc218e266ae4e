//! The HTTP API in-process on loopback: every kind of bad request gets a clear JSON error
//! with the right status, and nothing is written.

use hyper::{Method, StatusCode};
use zy_api::{CreatedToken, Health, TokenView};
use zy_cli::client::{Client, ClientError};
use zy_coordinator::config::CoordinatorConfig;
use zy_coordinator::store::statedir::StateDir;
use zy_coordinator::Coordinator;

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start() -> (TempDir, zy_coordinator::server::Running, Client, String) {
    start_with(CoordinatorConfig::default()).await
}

async fn start_with(
    config: CoordinatorConfig,
) -> (TempDir, zy_coordinator::server::Running, Client, String) {
    let dir = TempDir(std::env::temp_dir().join(format!("zy-api-test-{}", rand::random::<u64>())));
    let config = CoordinatorConfig {
        daemon_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    let sd = StateDir::new(&dir.0);
    let out = sd.init(&config, &[], "unused").unwrap();
    let running = Coordinator::open(sd.clone(), config)
        .unwrap()
        .start()
        .await
        .unwrap();
    let ca = std::fs::read_to_string(sd.ca_cert()).unwrap();
    let ca = zy_common::tls::certs_from_pem("ca", &ca).unwrap().remove(0);
    let tls = zy_common::tls::https_client_config(&ca).unwrap();
    let token = out.admin_token.to_string();
    let client = Client::new(&running.bound.api.to_string(), Some(token.clone()), tls);
    (dir, running, client, token)
}

fn api_err(e: ClientError) -> (StatusCode, String, String) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
        } => (status, code, message),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let (_dir, running, c, _token) = start().await;
    let h: Health = c.call(Method::GET, "/v1/health", None).await.unwrap();
    assert_eq!(h.status, "ok");

    let cases: Vec<(Method, &str, Option<serde_json::Value>, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/v1/tokens",
            Some(serde_json::json!({"zone": "moon", "ttl_secs": 600})),
            StatusCode::BAD_REQUEST,
            "unknown variant",
        ),
        (
            Method::POST,
            "/v1/tokens",
            Some(serde_json::json!({"zone": "intranet", "ttl_secs": 5})),
            StatusCode::BAD_REQUEST,
            "outside",
        ),
        (
            Method::POST,
            "/v1/tokens",
            Some(serde_json::json!({"zone": "intranet", "ttl_secs": 600, "admin": true})),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            Method::POST,
            "/v1/tokens",
            Some(serde_json::json!("garbage")),
            StatusCode::BAD_REQUEST,
            "bad token request",
        ),
        (
            Method::POST,
            "/v1/tokens",
            None,
            StatusCode::BAD_REQUEST,
            "bad token request",
        ),
        (
            Method::GET,
            "/v1/nodes/nope",
            None,
            StatusCode::NOT_FOUND,
            "no node",
        ),
        (
            Method::DELETE,
            "/v1/nodes/nope",
            None,
            StatusCode::NOT_FOUND,
            "no node",
        ),
        (
            Method::POST,
            "/v1/nodes/nope/ping",
            None,
            StatusCode::NOT_FOUND,
            "no node",
        ),
        (
            Method::DELETE,
            "/v1/tokens/xyz",
            None,
            StatusCode::BAD_REQUEST,
            "not a token id",
        ),
        (
            Method::DELETE,
            "/v1/tokens/0011223344556677",
            None,
            StatusCode::NOT_FOUND,
            "no token",
        ),
        (
            Method::GET,
            "/v1/nowhere",
            None,
            StatusCode::NOT_FOUND,
            "no such API path",
        ),
        (
            Method::PUT,
            "/v1/nodes",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "does not take that method",
        ),
    ];
    for (method, path, body, status, want) in cases {
        let e = c
            .call::<serde_json::Value>(method.clone(), path, body)
            .await
            .unwrap_err();
        let (got, _code, message) = api_err(e);
        assert_eq!(got, status, "{method} {path}: {message}");
        assert!(
            message.contains(want),
            "{method} {path}: `{message}` lacks `{want}`"
        );
    }
    // An oversized body is refused before it is read whole.
    let huge = serde_json::json!({"zone": "intranet", "ttl_secs": 600, "pad": "x".repeat(200_000)});
    let (status, ..) = api_err(
        c.call::<serde_json::Value>(Method::POST, "/v1/tokens", Some(huge))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let tokens: Vec<TokenView> = c.call(Method::GET, "/v1/tokens", None).await.unwrap();
    assert!(tokens.is_empty(), "no bad request wrote anything");

    let t: CreatedToken = c
        .call(
            Method::POST,
            "/v1/tokens",
            Some(serde_json::json!({"zone": "extranet", "ttl_secs": 600})),
        )
        .await
        .unwrap();
    assert!(t.token.starts_with("zyj1-"));
    running.shutdown().await;
}

#[tokio::test]
async fn every_route_but_health_and_the_document_needs_a_valid_token() {
    let (_dir, running, c, token) = start().await;
    let addr = running.bound.api.to_string();
    let ca = std::fs::read_to_string(running.coord.state.ca_cert()).unwrap();
    let ca = zy_common::tls::certs_from_pem("ca", &ca).unwrap().remove(0);
    let tls = || zy_common::tls::https_client_config(&ca).unwrap();
    let mut wrong = token.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    for bad in [None, Some("garbage".to_string()), Some(wrong)] {
        let anon = Client::new(&addr, bad, tls());
        for (m, p) in zy_coordinator::api::ROUTES {
            let method: Method = m.to_uppercase().parse().unwrap();
            let path = p
                .replace("{node}", "n1")
                .replace("{id}", "0011223344556677");
            let r = anon
                .call::<serde_json::Value>(method, &path, Some(serde_json::json!({})))
                .await;
            if *p == "/v1/health" || *p == "/v1/openapi.json" {
                assert!(r.is_ok(), "{m} {p} is public");
            } else {
                let (status, code, _) = api_err(r.unwrap_err());
                assert_eq!(
                    (status, code.as_str()),
                    (StatusCode::UNAUTHORIZED, "unauthorized"),
                    "{m} {p}"
                );
            }
        }
    }
    let doc: serde_json::Value = c.call(Method::GET, "/v1/openapi.json", None).await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_uploaded_by_hash_named_and_deleted_with_their_blobs() {
    use zy_api::{BlobView, ImageView};
    let (dir, running, c, _token) = start().await;
    let file = dir.0.join("kernel.bin");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let b: BlobView = c.upload("/v1/blobs", &file).await.unwrap();
    assert_eq!(b.hash, zy_common::blob::BlobHash::of(&bytes));
    assert_eq!(b.size, bytes.len() as u64);

    let img: ImageView = c
        .call(
            Method::POST,
            "/v1/images",
            Some(serde_json::json!({"name": "k1", "zone": "intranet", "kernel": b.hash, "cmdline": "console=ttyS0"})),
        )
        .await
        .unwrap();
    assert_eq!(img.size_bytes, bytes.len() as u64);
    let bad: Vec<(serde_json::Value, StatusCode, &str)> = vec![
        (
            serde_json::json!({"name": "k1", "zone": "intranet", "kernel": b.hash}),
            StatusCode::CONFLICT,
            "exists",
        ),
        (
            serde_json::json!({"name": "k2", "zone": "intranet", "kernel": "00".repeat(32)}),
            StatusCode::BAD_REQUEST,
            "not stored here",
        ),
        (
            serde_json::json!({"name": "k3", "zone": "intranet", "kernel": b.hash, "disk": b.hash}),
            StatusCode::BAD_REQUEST,
            "exactly one",
        ),
        (
            serde_json::json!({"name": "Bad Name", "zone": "intranet", "kernel": b.hash}),
            StatusCode::BAD_REQUEST,
            "bad image name",
        ),
        (
            serde_json::json!({"name": "k4", "zone": "intranet", "disk": b.hash, "cmdline": "x"}),
            StatusCode::BAD_REQUEST,
            "go with a kernel",
        ),
        (
            serde_json::json!({"name": "k5", "zone": "intranet", "kernel": "xyz"}),
            StatusCode::BAD_REQUEST,
            "bad image request",
        ),
    ];
    for (body, status, want) in bad {
        let (got, _, msg) = api_err(
            c.call::<serde_json::Value>(Method::POST, "/v1/images", Some(body.clone()))
                .await
                .unwrap_err(),
        );
        assert_eq!(got, status, "{body}: {msg}");
        assert!(msg.contains(want), "{body}: `{msg}` lacks `{want}`");
    }
    // A qcow2 disk image is recognised with its virtual size.
    let q = dir.0.join("d.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("1G")
        .output()
        .unwrap();
    assert!(out.status.success());
    let qb: BlobView = c.upload("/v1/blobs", &q).await.unwrap();
    let disk: ImageView = c
        .call(
            Method::POST,
            "/v1/images",
            Some(serde_json::json!({"name": "d1", "zone": "intranet", "disk": qb.hash, "format": "qcow2"})),
        )
        .await
        .unwrap();
    // Review finding 4: images are inspected, not trusted. A qcow2 whose header names a
    // host file as its backing file, the same declared raw, and a declaration missing.
    let evil = dir.0.join("evil.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
        ])
        .arg(&evil)
        .arg("1G")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eb: BlobView = c.upload("/v1/blobs", &evil).await.unwrap();
    for (body, want) in [
        (
            serde_json::json!({"name": "e1", "zone": "intranet", "disk": eb.hash, "format": "qcow2"}),
            "backing file",
        ),
        (
            serde_json::json!({"name": "e2", "zone": "intranet", "disk": eb.hash, "format": "raw"}),
            "declared raw but the file is a qcow2",
        ),
        (
            serde_json::json!({"name": "e3", "zone": "intranet", "disk": qb.hash}),
            "format",
        ),
        (
            serde_json::json!({"name": "e4", "zone": "intranet", "disk": b.hash, "format": "qcow2"}),
            "declared qcow2 but the file is a raw",
        ),
        (
            serde_json::json!({"name": "e5", "disk": qb.hash, "format": "qcow2"}),
            "say whose the image is",
        ),
        (
            serde_json::json!({"name": "e6", "disk": qb.hash, "format": "qcow2", "zone": "intranet", "shared": true}),
            "say whose the image is",
        ),
    ] {
        let (got, _, msg) = api_err(
            c.call::<serde_json::Value>(Method::POST, "/v1/images", Some(body.clone()))
                .await
                .unwrap_err(),
        );
        assert_eq!(got, StatusCode::BAD_REQUEST, "{body}: {msg}");
        assert!(msg.contains(want), "{body}: `{msg}` lacks `{want}`");
    }
    assert!(matches!(
        disk.kind,
        zy_common::image::ImageKind::Disk {
            format: zy_common::image::DiskFormat::Qcow2,
            virtual_size: 1073741824,
            ..
        }
    ));
    let list: Vec<ImageView> = c.call(Method::GET, "/v1/images", None).await.unwrap();
    assert_eq!(list.len(), 2);

    // Deleting removes the image and the blob nothing else uses.
    let _: ImageView = c.call(Method::DELETE, "/v1/images/k1", None).await.unwrap();
    assert!(!running.coord.blobs.has(&b.hash));
    assert!(running.coord.blobs.has(&qb.hash));
    running.shutdown().await;
}

/// Review finding 12: about 600 idle TCP connections (each holding one of 512 slots until its
/// TLS handshake timed out after 10 s) made `zy status` take 10 s, and 700 re-opened in a
/// loop made it fail. One source must not starve the others: here 700 connections that
/// never say a word come from 127.0.0.2 and keep being re-opened, while a client from
/// 127.0.0.1 is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_source_cannot_starve_the_api() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let (_dir, running, c, _token) = start().await;
    let api = running.bound.api;
    let open = move || async move {
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        s.bind("127.0.0.2:0".parse().unwrap()).ok()?;
        s.connect(api).await.ok()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 700 opened at once and held, and more opened and dropped in a loop, until the end.
    let attack = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let held: Vec<tokio::net::TcpStream> =
                futures_util::future::join_all((0..700).map(|_| open()))
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = open().await;
            }
            held.len()
        })
    };
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    for _ in 0..5 {
        let h: Health = tokio::time::timeout(
            std::time::Duration::from_secs(8),
            c.call(Method::GET, "/v1/health", None),
        )
        .await
        .expect("the API answered another source while one held 700 idle connections")
        .unwrap();
        assert_eq!(h.status, "ok");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        attack.await.unwrap() >= 500,
        "the attack opened its connections"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_are_named_listed_without_secrets_and_revoked_for_good() {
    use zy_api::{ApiTokenView, CaView, CreatedApiToken};
    let (_dir, running, admin, token) = start().await;
    let addr = running.bound.api.to_string();
    let ca = std::fs::read_to_string(running.coord.state.ca_cert()).unwrap();
    let ca = zy_common::tls::certs_from_pem("ca", &ca).unwrap().remove(0);
    let as_token = |t: &str| {
        Client::new(
            &addr,
            Some(t.to_string()),
            zy_common::tls::https_client_config(&ca).unwrap(),
        )
    };
    let create = |c: &Client, body: serde_json::Value| {
        let c = c.clone();
        async move {
            c.call::<CreatedApiToken>(Method::POST, "/v1/apitokens", Some(body))
                .await
        }
    };
    let ci = create(
        &admin,
        serde_json::json!({"name": "ci", "expires_in_secs": 3600}),
    )
    .await
    .unwrap();
    assert!(ci.token.starts_with("zya1-") && ci.expires_at.is_some());
    // Names are unique among live tokens; bad names and lifetimes are refused.
    for (body, status) in [
        (serde_json::json!({"name": "ci"}), StatusCode::CONFLICT),
        (
            serde_json::json!({"name": "Bad Name"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            serde_json::json!({"name": "x", "expires_in_secs": 5}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, _, m) = api_err(create(&admin, body).await.unwrap_err());
        assert_eq!(s, status, "{m}");
    }
    // The new token works, the listing has no secret and marks the caller's token.
    let c = as_token(&ci.token);
    let ls: Vec<ApiTokenView> = c.call(Method::GET, "/v1/apitokens", None).await.unwrap();
    assert_eq!(ls.len(), 2);
    let text = serde_json::to_string(&ls).unwrap();
    assert!(!text.contains(&ci.token[22..]) && !text.contains(&token[22..]));
    let me = ls.iter().find(|t| t.current).unwrap();
    assert_eq!((me.name.as_str(), me.status.as_str()), ("ci", "valid"));
    assert!(me.last_used_at.is_some(), "{me:?}");
    assert_eq!(me.created_by.as_deref(), Some(&token[5..21]));
    let ca_view: CaView = c.call(Method::GET, "/v1/ca", None).await.unwrap();
    assert!(ca_view.server.days_left >= 396 && ca_view.ca.days_left > 3000);

    // One's own token only with force; then it is refused, saying why.
    let (s, code, _) = api_err(
        c.call::<ApiTokenView>(Method::DELETE, "/v1/apitokens/ci", None)
            .await
            .unwrap_err(),
    );
    assert_eq!((s, code.as_str()), (StatusCode::CONFLICT, "own_token"));
    let r: ApiTokenView = c
        .call(Method::DELETE, "/v1/apitokens/ci?force=true", None)
        .await
        .unwrap();
    assert_eq!(r.status, "revoked");
    let (s, code, m) = api_err(
        c.call::<Health>(Method::GET, "/v1/nodes", None)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::UNAUTHORIZED, "token_revoked"),
        "{m}"
    );
    assert!(m.contains("`ci` was revoked"), "{m}");
    // The name is free again; the last valid token cannot be revoked, even with force.
    create(&admin, serde_json::json!({"name": "ci"}))
        .await
        .unwrap();
    let admin_id = &token[5..21];
    admin
        .call::<ApiTokenView>(Method::DELETE, "/v1/apitokens/ci", None)
        .await
        .unwrap();
    let (s, code, _) = api_err(
        admin
            .call::<ApiTokenView>(
                Method::DELETE,
                &format!("/v1/apitokens/{admin_id}?force=true"),
                None,
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((s, code.as_str()), (StatusCode::CONFLICT, "last_token"));

    // An expired token: 401 naming it (made to expire by the store, as time would).
    let short = create(
        &admin,
        serde_json::json!({"name": "short", "expires_in_secs": 60}),
    )
    .await
    .unwrap();
    let id: zy_common::ids::TokenId = short.id.parse().unwrap();
    running
        .coord
        .api_tokens
        .write()
        .unwrap()
        .get_mut(&id)
        .unwrap()
        .expires_at_ms = Some(1);
    let (s, code, m) = api_err(
        as_token(&short.token)
            .call::<Health>(Method::GET, "/v1/nodes", None)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (s, code.as_str()),
        (StatusCode::UNAUTHORIZED, "token_expired"),
        "{m}"
    );
    running.shutdown().await;
}

/// Enrolls a node straight into the store and the fleet (no agent: it never connects).
fn enroll(coord: &zy_coordinator::Coordinator, name: &str) -> zy_common::NodeId {
    use zy_common::ids::TokenId;
    use zy_coordinator::store::{Admin, NodeRecord, TokenRecord};
    let now = zy_common::time::now_millis();
    let token = TokenId::new_random();
    let secret = zy_common::token::SecretHash([7; 32]);
    coord
        .store
        .insert_token(&TokenRecord {
            id: token,
            secret_hash: secret,
            zone: zy_common::Zone::Intranet,
            created_at_ms: now,
            expires_at_ms: now + 3_600_000,
            revoked_at_ms: None,
            used: None,
            created_by: token,
        })
        .unwrap();
    let rec = NodeRecord {
        id: zy_common::NodeId::new_random(),
        name: name.into(),
        zone: zy_common::Zone::Intranet,
        state: zy_coordinator::fleet::membership::NodeState::Enrolled,
        state_since_ms: now,
        enrolled_at_ms: now,
        token,
        last_seen_ms: 0,
        inventory: None,
        cert: None,
        admin: Admin::Active,
        admin_since_ms: 0,
    };
    let rec = coord.store.enroll(token, secret, rec, now).unwrap();
    let id = rec.id;
    coord.fleet.insert_enrolled(rec, std::time::Instant::now());
    id
}

async fn node(c: &Client, name: &str) -> zy_api::NodeView {
    c.call(Method::GET, &format!("/v1/nodes/{name}"), None)
        .await
        .unwrap()
}

/// Drain, undrain, standby and wake of unknown nodes, of nodes in the wrong state, without a
/// power driver; consolidations asked with absurd bounds: each a clear error, nothing changed.
/// A drain of an empty node ends in maintenance, recorded in the node's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_administration_refuses_what_does_not_apply_and_records_what_does() {
    let (_dir, running, c, _token) = start().await;
    enroll(&running.coord, "n1");
    for action in ["drain", "undrain", "standby", "wake"] {
        let e = c
            .call::<serde_json::Value>(Method::POST, &format!("/v1/nodes/nope/{action}"), None)
            .await
            .unwrap_err();
        let (status, _, msg) = api_err(e);
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}");
        assert!(msg.contains("no node"), "{action}: {msg}");
    }
    // No [power]: standby is refused with how to configure it; the node stays active.
    let e = c
        .call::<serde_json::Value>(Method::POST, "/v1/nodes/n1/standby", None)
        .await
        .unwrap_err();
    let (status, code, msg) = api_err(e);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "power_not_configured")
    );
    assert!(msg.contains("[power]") && msg.contains("ipmitool"), "{msg}");
    let e = c
        .call::<serde_json::Value>(Method::POST, "/v1/nodes/n1/wake", None)
        .await
        .unwrap_err();
    let (status, _, msg) = api_err(e);
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(msg.contains("not on standby"), "{msg}");
    assert_eq!(node(&c, "n1").await.admin, "active");

    // An empty node drains at once into maintenance.
    let v: zy_api::NodeView = c
        .call(Method::POST, "/v1/nodes/n1/drain", None)
        .await
        .unwrap();
    assert!(
        ["draining", "maintenance"].contains(&v.admin.as_str()),
        "{}",
        v.admin
    );
    let mut admin = v.admin;
    for _ in 0..50 {
        if admin == "maintenance" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        admin = node(&c, "n1").await.admin;
    }
    assert_eq!(admin, "maintenance");
    let v: zy_api::NodeView = c
        .call(Method::POST, "/v1/nodes/n1/undrain", None)
        .await
        .unwrap();
    assert_eq!(v.admin, "active");
    let d: zy_api::NodeDetail = c.call(Method::GET, "/v1/nodes/n1", None).await.unwrap();
    let changes: Vec<String> = d
        .admin_transitions
        .iter()
        .map(|t| format!("{}>{}", t.from, t.to))
        .collect();
    assert_eq!(
        changes,
        [
            "active>draining",
            "draining>maintenance",
            "maintenance>active"
        ]
    );

    // Consolidation: absurd bounds refused, a plan shown otherwise.
    for q in [
        "max_moves=0",
        "max_moves=1000000",
        "min_gain=5",
        "min_gain=-1",
    ] {
        let e = c
            .call::<serde_json::Value>(Method::GET, &format!("/v1/plan/consolidate?{q}"), None)
            .await
            .unwrap_err();
        assert_eq!(api_err(e).0, StatusCode::BAD_REQUEST, "{q}");
    }
    let e = c
        .call::<serde_json::Value>(
            Method::POST,
            "/v1/plan/consolidate",
            Some(serde_json::json!({"max_moves": 0})),
        )
        .await
        .unwrap_err();
    let (status, _, msg) = api_err(e);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("max_moves is 0"), "{msg}");
    let p: zy_api::ConsolidationView = c
        .call(Method::GET, "/v1/plan/consolidate?max_moves=3", None)
        .await
        .unwrap();
    assert!(p.steps.is_empty() && p.run.is_none(), "{p:?}");
    running.shutdown().await;
}

/// The power driver: a command that fails or hangs past its limit is a clear error and
/// changes nothing; one that succeeds marks the node, and a standby node's silence raises
/// nothing; wake brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_commands_that_fail_or_hang_change_nothing() {
    let script = "case {name} in fail) echo BMC unreachable >&2; exit 4;; hang) sleep 60;; esac";
    let config = CoordinatorConfig {
        power: Some(zy_coordinator::config::PowerConfig {
            standby: vec!["sh".into(), "-c".into(), script.into()],
            wake: vec!["sh".into(), "-c".into(), script.into()],
            timeout: std::time::Duration::from_secs(1),
        }),
        ..CoordinatorConfig::default()
    };
    let (_dir, running, c, _token) = start_with(config).await;
    for n in ["fail", "hang", "ok"] {
        enroll(&running.coord, n);
    }
    let e = c
        .call::<serde_json::Value>(Method::POST, "/v1/nodes/fail/standby", None)
        .await
        .unwrap_err();
    let (status, code, msg) = api_err(e);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_GATEWAY, "power_failed")
    );
    assert!(
        msg.contains("BMC unreachable") && msg.contains("stays active"),
        "{msg}"
    );
    assert_eq!(node(&c, "fail").await.admin, "active");
    let t0 = std::time::Instant::now();
    let e = c
        .call::<serde_json::Value>(Method::POST, "/v1/nodes/hang/standby", None)
        .await
        .unwrap_err();
    let (status, _, msg) = api_err(e);
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(msg.contains("did not finish within 1s"), "{msg}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(node(&c, "hang").await.admin, "active");

    let v: zy_api::NodeView = c
        .call(Method::POST, "/v1/nodes/ok/standby", None)
        .await
        .unwrap();
    assert_eq!(v.admin, "standby");
    // Drain and undrain do not apply to a standby node; wake does.
    let e = c
        .call::<serde_json::Value>(Method::POST, "/v1/nodes/ok/drain", None)
        .await
        .unwrap_err();
    assert!(api_err(e).2.contains("wake it first"));
    let v: zy_api::NodeView = c
        .call(Method::POST, "/v1/nodes/ok/wake", None)
        .await
        .unwrap();
    assert_eq!(v.admin, "active");
    running.shutdown().await;
}

/// Connects an enrolled node with a fake session (nothing answers its commands) and an
/// inventory of `memory_mib`: it is Ready to the packer. Keep what it returns alive.
fn connect(
    coord: &zy_coordinator::Coordinator,
    id: zy_common::NodeId,
    memory_mib: u64,
) -> (
    tokio::sync::mpsc::Receiver<zy_common::proto::Message>,
    tokio::sync::watch::Receiver<Option<zy_coordinator::fleet::Kick>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (s, kick) = zy_coordinator::fleet::Session::new(
        coord.fleet.next_session_id(),
        "127.0.0.1:1".parse().unwrap(),
        tx,
    );
    let inv = zy_common::proto::Inventory {
        hostname: "h".into(),
        cpus: 4,
        cpu_model: "c".into(),
        memory_bytes: memory_mib << 20,
        disk_total_bytes: 100 << 30,
        disk_free_bytes: 100 << 30,
        kvm_usable: false,
        accel: zy_common::proto::Accel::Tcg,
        zone: zy_common::Zone::Intranet,
        agent_version: "0".into(),
        kernel: "k".into(),
    };
    let now = zy_common::time::now_millis();
    coord
        .fleet
        .attach(id, s, inv, std::time::Instant::now(), now)
        .unwrap();
    coord.fleet.tick(std::time::Instant::now(), now);
    (rx, kick)
}

/// Records a VM placed on `node`, running or stopped as its node last said.
async fn place_vm(
    coord: &zy_coordinator::Coordinator,
    name: &str,
    node: zy_common::NodeId,
    memory_mib: u64,
    running: bool,
) {
    use zy_common::vm::{Generation, VmState};
    use zy_coordinator::store::{Observed, VmRec};
    let rec = VmRec {
        id: zy_common::VmId::new_random(),
        name: name.into(),
        zone: zy_common::Zone::Intranet,
        vcpus: 1,
        memory_mib,
        disk_gib: 1,
        image: "i".into(),
        boot: zy_common::image::ImageKind::Kernel {
            kernel: zy_common::blob::BlobHash([0; 32]),
            initrd: None,
            cmdline: String::new(),
        },
        node: Some(node),
        desired: if running {
            zy_api::VmDesired::Running
        } else {
            zy_api::VmDesired::Stopped
        },
        generation: Generation(1),
        observed: Some(Observed {
            state: if running {
                VmState::Running
            } else {
                VmState::Stopped
            },
            pid: None,
            intent: Generation(1),
            generation: Generation(1),
            at_ms: 0,
        }),
        mac: [0x52, 0x54, 0, 1, 2, memory_mib as u8],
        ip: std::net::Ipv4Addr::new(10, 220, 0, 9),
        created_at_ms: 0,
        rev: 1,
        ssh_keys: vec![],
        user_data: None,
        anti_affinity: None,
        migrating_to: None,
        moved_at_ms: None,
    };
    coord
        .vms
        .write(|_| {
            let mut b = zy_coordinator::vms::Batch::default();
            b.put(None, rec.clone());
            Ok((b, ()))
        })
        .await
        .unwrap();
}

/// A node with VMs does not stand by; a drain whose VMs could go nowhere is refused and
/// changes nothing; a stopped VM does not stop a drain from being asked, but holds it back
/// with a note saying it cannot move live, and is left where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_that_cannot_end_are_refused_and_stopped_vms_hold_a_drain_back() {
    let config = CoordinatorConfig {
        power: Some(zy_coordinator::config::PowerConfig {
            standby: vec!["true".into()],
            wake: vec!["true".into()],
            timeout: std::time::Duration::from_secs(5),
        }),
        ..CoordinatorConfig::default()
    };
    let (_dir, running, c, _token) = start_with(config).await;
    let coord = &running.coord;
    let big = enroll(coord, "big");
    let small = enroll(coord, "small");
    let _a = connect(coord, big, 16_384);
    let _b = connect(coord, small, 2_048);
    place_vm(coord, "huge", big, 8_192, true).await;
    let e = c
        .call::<serde_json::Value>(Method::POST, "/v1/nodes/big/standby", None)
        .await
        .unwrap_err();
    let (status, _, msg) = api_err(e);
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(msg.contains("holds 1 VM(s) (huge)"), "{msg}");
    let e = c
        .call::<serde_json::Value>(Method::POST, "/v1/nodes/big/drain", None)
        .await
        .unwrap_err();
    let (status, code, msg) = api_err(e);
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "no_room"));
    assert!(
        msg.contains("cannot be drained") && msg.contains("VM huge") && msg.contains("memory"),
        "{msg}"
    );
    assert_eq!(node(&c, "big").await.admin, "active");

    // A stopped VM: the drain is taken, and held back with a note naming it.
    place_vm(coord, "sleepy", small, 256, false).await;
    let v: zy_api::NodeView = c
        .call(Method::POST, "/v1/nodes/small/drain", None)
        .await
        .unwrap();
    assert_eq!(v.admin, "draining");
    let mut note = None;
    for _ in 0..50 {
        note = node(&c, "small").await.admin_note;
        if note.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let note = note.expect("a note");
    assert!(
        note.contains("sleepy (stopped)") && note.contains("only running VMs migrate"),
        "{note}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(node(&c, "small").await.admin, "draining");
    let v: zy_api::VmView = c.call(Method::GET, "/v1/vms/sleepy", None).await.unwrap();
    assert_eq!(v.node.as_deref(), Some("small"));
    running.shutdown().await;
}
