//! Nodes fetch image blobs from the coordinator by hash over QUIC, verified on arrival.

use std::time::Duration;

use zy_agent::uplink::{fetch_blob, Conn, FetchError};
use zy_api::ImageView;
use zy_common::blob::{BlobDir, BlobHash};
use zy_common::proto::{Message, RefusalCode};
use zy_common::wire;
use zy_lab::peer::{connect_as_node, endpoint_in};
use zy_lab::site::Site;

#[test]
fn nodes_fetch_blobs_by_hash_and_verify_them() {
    let site = Site::new(1).unwrap();
    site.join(1, "intranet").unwrap();
    let file = site.lab.dir.join("kernel.bin");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let img: ImageView = site
        .zy_json(&[
            "image",
            "import",
            "--kernel",
            file.to_str().unwrap(),
            "--name",
            "k1",
            "--zone",
            "intranet",
        ])
        .unwrap();
    // The same bytes again as another zone's image: stored once, named twice.
    let ext: ImageView = site
        .zy_json(&[
            "image",
            "import",
            "--kernel",
            file.to_str().unwrap(),
            "--name",
            "k2",
            "--zone",
            "extranet",
        ])
        .unwrap();
    assert_eq!(ext.kind, img.kind);
    let hash = zy_common::image::ImageKind::blobs(&img.kind)[0];
    assert_eq!(hash, BlobHash::of(&bytes));
    let table = String::from_utf8(site.zy(&["image", "ls"]).stdout).unwrap();
    assert!(table.contains("k1") && table.contains("kernel"), "{table}");

    let cache = BlobDir::open(&site.lab.dir.join("cache")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = endpoint_in(&site.lab, &site.lab.node_ns(1), None, 0);
        let (conn, version, _send, _recv) =
            connect_as_node(&site, &ep, 1, zy_common::Zone::Intranet).await;
        let c = Conn {
            conn: conn.clone(),
            version,
        };
        // Review finding 5: any node could fetch any blob. Now only what a VM placed on it
        // boots: nothing yet, and an image of the other zone never.
        assert!(matches!(
            fetch_blob(&c, hash, &cache).await,
            Err(FetchError::NotFound(_))
        ));
        let out = site.zy(&[
            "vm", "create", "--name", "x1", "--zone", "intranet", "--memory", "64", "--image", "k2",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("extranet zone"),
            "{err}"
        );
        site.zy_ok(&[
            "vm",
            "create",
            "--name",
            "v1",
            "--zone",
            "intranet",
            "--memory",
            "64",
            "--image",
            "k1",
            "--no-wait",
        ]);
        fetch_blob(&c, hash, &cache).await.unwrap();
        assert_eq!(std::fs::read(cache.path(&hash)).unwrap(), bytes);
        let unknown = BlobHash([9; 32]);
        assert!(matches!(
            fetch_blob(&c, unknown, &cache).await,
            Err(FetchError::NotFound(_))
        ));
        assert!(!cache.has(&unknown));
        // A blob corrupted at the coordinator (disk rot, tampering) is refused on arrival and
        // never lands in the cache.
        let stored = site.state.join("blobs").join(hash.to_string());
        let mut bad = bytes.clone();
        bad[1000] ^= 0xff;
        std::fs::write(&stored, &bad).unwrap();
        cache.remove(&hash).unwrap();
        let err = fetch_blob(&c, hash, &cache).await.unwrap_err();
        assert!(err.to_string().contains("corrupt or tampered"), "{err}");
        assert!(!cache.has(&hash));
        assert_eq!(
            std::fs::read_dir(site.lab.dir.join("cache"))
                .unwrap()
                .count(),
            0,
            "no partial file left"
        );
        // Something other than a fetch on a stream of its own is refused; the session lives.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        wire::write_frame(&mut send, version, &Message::Load(load()))
            .await
            .unwrap();
        let mut buf = Vec::new();
        let m: Message = wire::read_frame(&mut recv, version, wire::MAX_BODY, &mut buf)
            .await
            .unwrap();
        assert!(matches!(m, Message::Refused(r) if r.code == RefusalCode::BadRequest));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(conn.close_reason().is_none());
        // An image in use cannot be deleted; the message names its VMs.
        let out = site.zy(&["image", "rm", "k1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("used by 1 VM(s): v1"),
            "{err}"
        );
    });
}

fn load() -> zy_common::proto::LoadReport {
    zy_common::proto::LoadReport {
        seq: 1,
        cpu_percent: 0.0,
        mem_used_bytes: 0,
        mem_available_bytes: 0,
        load1: 0.0,
        load5: 0.0,
        load15: 0.0,
        net_rx_bytes: 0,
        net_tx_bytes: 0,
        disk_free_bytes: 0,
    }
}

/// Review finding 6: the agent wrote and fsync'd image downloads on its only runtime thread,
/// so a slow disk held back its load reports and keep-alives. A node fetching a 2 GiB image
/// onto a disk that takes 80 MiB/s (and waits for the device on every write) must stay
/// Ready throughout. (How late its reports get is a figure of the VM bench, not asserted.)
#[test]
fn a_node_fetching_a_big_image_on_a_slow_disk_stays_ready() {
    const SIZE: u64 = 2 << 30;
    let (site, disk) = Site::with_slow_node("intranet", 8, 80 << 20).unwrap();
    let image = site.lab.dir.join("big.raw");
    // Not all zeros: a pattern at the start and the end, a hole between.
    zy_lab::slowdisk::write_sparse_image(&image, SIZE).unwrap();
    site.zy_ok(&[
        "image",
        "import",
        &image.to_string_lossy(),
        "--format",
        "raw",
        "--name",
        "big",
        "--zone",
        "intranet",
    ]);
    let _ = std::fs::remove_file(&image);
    let before = disk.written();
    site.zy_ok(&[
        "vm",
        "create",
        "--name",
        "b1",
        "--zone",
        "intranet",
        "--memory",
        "128",
        "--disk",
        "3",
        "--image",
        "big",
        "--no-wait",
    ]);
    let t0 = std::time::Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut samples = 0;
    zy_lab::wait_for("b1 to run", Duration::from_secs(600), || {
        let n = site.nodes().ok()?.into_iter().find(|n| n.name == "n1")?;
        assert_eq!(
            n.state, "ready",
            "the node left Ready while fetching: {n:?}"
        );
        samples += 1;
        seen.insert(n.last_seen_ms);
        let v: serde_json::Value = site.zy_json(&["vm", "show", "b1"]).ok()?;
        assert_ne!(v["state"], "failed", "{v}");
        (v["state"] == "running").then_some(())
    })
    .unwrap();
    let took = t0.elapsed();
    let written = disk.written() - before;
    assert!(
        written >= SIZE,
        "the image went through the slow disk: {written} bytes written"
    );
    let gaps: Vec<u64> = seen
        .iter()
        .zip(seen.iter().skip(1))
        .map(|(a, b)| b - a)
        .collect();
    println!(
        "fetched {} MiB in {took:?} ({} MiB written), {samples} samples, node Ready in all; \
         longest report gap seen {} ms",
        SIZE >> 20,
        written >> 20,
        gaps.iter().max().copied().unwrap_or(0)
    );
}
