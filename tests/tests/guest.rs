//! Guest access end to end: a disk-image VM given an SSH key with `zy vm create --ssh-key`
//! lets a peer VM in with it (dropbear in the test guest plays sshd and ssh), learns its
//! zone's default route and name servers from the seed, and its seed holds the owner's
//! user-data as given; each seed is a volume of its own. Bad keys and user-data are refused
//! at the API, naming the field.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zy_api::VmView;
use zy_lab::site::Site;
use zy_lab::wait_for;

const BOOT: Duration = Duration::from_secs(180);

const USER_DATA: &str = "#cloud-config\n# YAML 1.1 to cloud-init: 0644 is octal, yes is true\nssh_pwauth: yes\nwrite_files:\n  - path: /etc/zy-test\n    permissions: 0644\n    content: hello\n";

fn console(site: &Site, v: &VmView) -> String {
    let log = site
        .agent_dir(1)
        .join("vms")
        .join(v.id.to_string())
        .join("console.log");
    std::fs::read_to_string(log).unwrap_or_default()
}

fn wait_console(site: &Site, v: &VmView, want: &str) -> String {
    wait_for(&format!("`{want}` on {}'s console", v.name), BOOT, || {
        let c = console(site, v);
        c.contains(want).then_some(c)
    })
    .unwrap_or_else(|e| panic!("{e}\nconsole of {}:\n{}", v.name, console(site, v)))
}

/// The files of a VM's seed as the node wrote it, and its volume serial.
fn seed(site: &Site, v: &VmView) -> (Vec<(String, String)>, u32) {
    let path = site
        .agent_dir(1)
        .join("vms")
        .join(v.id.to_string())
        .join("seed.img");
    let fs = fatfs::FileSystem::new(std::fs::File::open(&path).unwrap(), fatfs::FsOptions::new())
        .unwrap();
    assert_eq!(fs.volume_label(), "CIDATA");
    let mut files = Vec::new();
    for e in fs.root_dir().iter() {
        let e = e.unwrap();
        let mut text = String::new();
        e.to_file().read_to_string(&mut text).unwrap();
        files.push((e.file_name(), text));
    }
    files.sort();
    (files, fs.volume_id())
}

fn file<'a>(files: &'a [(String, String)], name: &str) -> &'a str {
    &files.iter().find(|(n, _)| n == name).unwrap().1
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_disk_image_vm_lets_a_peer_in_with_its_key_and_learns_its_zones_route_and_resolver() {
    let site = Site::with_agents_configured(&["intranet"], |cfg| {
        let z = &mut cfg.zones.intranet;
        z.gateway = Some("10.220.0.1".parse().unwrap());
        z.nameservers = vec!["10.220.0.1".parse().unwrap(), "192.0.2.53".parse().unwrap()];
        z.search = vec!["lab.zy.internal".into()];
    })
    .unwrap();
    let ok = |args: &[&str]| site.zy_ok(args);
    let show = |name: &str| -> VmView { site.zy_json(&["vm", "show", name]).unwrap() };
    // The peer: a kernel guest that makes a key, shows it, and logs in to 10.220.0.3.
    site.import_guest(
        "peer",
        "console=ttyS0 quiet no_timer_check zy.sshkey=1 zy.sshto=10.220.0.3",
    )
    .unwrap();
    site.import_disk("disk", "intranet").unwrap();
    ok(&[
        "vm", "create", "--name", "p1", "--zone", "intranet", "--memory", "192", "--image", "peer",
    ]);
    let p1 = show("p1");
    assert_eq!(p1.ip.to_string(), "10.220.0.2");
    let c = wait_console(&site, &p1, "ZY-SSHKEY ");
    let key = c
        .lines()
        .find_map(|l| l.trim().strip_prefix("ZY-SSHKEY "))
        .unwrap()
        .trim()
        .to_string();
    // A kernel guest has the zone's route and resolver on its command line.
    assert!(c.contains("ZY-ROUTE default via 10.220.0.1"), "{c}");
    assert!(
        c.contains("ZY-DNS 10.220.0.1 192.0.2.53 search lab.zy.internal"),
        "{c}"
    );

    let files = site.lab.dir.clone();
    let key_file = write(&files, "p1.pub", &format!("# the peer's key\n{key}\n"));
    let ud = write(&files, "user-data.yaml", USER_DATA);
    let (k, u) = (key_file.to_string_lossy(), ud.to_string_lossy());

    // Refused at the API, naming the field; nothing is made.
    let bad_key = write(
        &files,
        "bad.pub",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== x\n",
    );
    let bad_ud = write(&files, "bad.yaml", "#!/bin/sh\necho hi\n");
    let list_ud = write(&files, "list.yaml", "#cloud-config\n- a\n");
    let private = write(
        &files,
        "id_ed25519",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    );
    let (bk, bu, lu, pk) = (
        bad_key.to_string_lossy(),
        bad_ud.to_string_lossy(),
        list_ud.to_string_lossy(),
        private.to_string_lossy(),
    );
    let base = [
        "vm", "create", "--name", "x", "--zone", "intranet", "--disk", "1",
    ];
    for (extra, want) in [
        (
            vec!["--image", "disk", "--ssh-key", &bk],
            "ssh_keys[0] has a body that is not a ssh-ed25519 key",
        ),
        (
            vec!["--image", "disk", "--user-data", &bu],
            "user_data does not start with a `#cloud-config` line",
        ),
        (
            vec!["--image", "disk", "--user-data", &lu],
            "user_data is a YAML list",
        ),
        (
            vec!["--image", "disk", "--ssh-key", &pk],
            "is a private key",
        ),
        (
            vec!["--image", "peer", "--ssh-key", &k],
            "boots a kernel directly",
        ),
    ] {
        let mut a: Vec<&str> = base.to_vec();
        a.extend(extra);
        let out = site.zy(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{a:?}: {err}");
        assert!(err.contains(want), "{a:?}: {err}");
    }

    ok(&[
        "vm",
        "create",
        "--name",
        "d1",
        "--zone",
        "intranet",
        "--memory",
        "256",
        "--disk",
        "1",
        "--image",
        "disk",
        "--ssh-key",
        &k,
        "--user-data",
        &u,
    ]);
    ok(&[
        "vm", "create", "--name", "d2", "--zone", "intranet", "--memory", "192", "--disk", "1",
        "--image", "disk",
    ]);
    let (d1, d2) = (show("d1"), show("d2"));
    assert_eq!(d1.ip.to_string(), "10.220.0.3");
    assert_eq!(d1.ssh_keys, vec![key.clone()]);
    assert_eq!(d1.user_data_bytes, Some(USER_DATA.len() as u64));
    assert!(d2.ssh_keys.is_empty() && d2.user_data_bytes.is_none());
    let detail = ok(&["vm", "show", "d1"]);
    assert!(detail.contains(&format!("ssh key:   {key}")), "{detail}");

    // The disk guest takes its key, route and resolver from the seed; the peer gets in.
    let c = wait_console(&site, &d1, "ZY-SSHD 1 keys");
    for want in [
        "ZY-NET 10.220.0.3/16 mtu 1450",
        "ZY-ROUTE default via 10.220.0.1",
        "ZY-DNS 10.220.0.1 192.0.2.53 search lab.zy.internal",
    ] {
        assert!(c.contains(want), "{want} missing from d1's console:\n{c}");
    }
    wait_console(&site, &p1, "ZY-SSH-OK d1");
    // d2 has no key: no sshd.
    let c2 = wait_console(&site, &d2, "ZY-READY d2");
    assert!(!c2.contains("ZY-SSHD"), "{c2}");

    // The seeds as the node wrote them: the key in meta-data, the owner's document byte for
    // byte, Zhengyun's defaults in vendor-data, the route and resolver in network-config;
    // each seed a volume of its own.
    let (f1, serial1) = seed(&site, &d1);
    let (f2, serial2) = seed(&site, &d2);
    let names: Vec<&str> = f1.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["meta-data", "network-config", "user-data", "vendor-data"]
    );
    assert!(file(&f1, "meta-data").contains(&format!("public-keys:\n  - \"{key}\"\n")));
    assert_eq!(file(&f1, "user-data"), USER_DATA);
    let vendor = file(&f1, "vendor-data");
    assert!(vendor.starts_with("#cloud-config\n") && vendor.contains("\nssh_pwauth: false\n"));
    let net = file(&f1, "network-config");
    assert!(net.contains("via: 10.220.0.1\n"), "{net}");
    assert!(
        net.contains("addresses: [10.220.0.1, 192.0.2.53]\n"),
        "{net}"
    );
    assert!(net.contains("search: [lab.zy.internal]\n"), "{net}");
    assert!(!file(&f2, "meta-data").contains("public-keys"));
    assert_eq!(file(&f2, "user-data"), "#cloud-config\n");
    assert_ne!(serial1, serial2, "two seeds share a volume serial");

    for vm in ["d1", "d2", "p1"] {
        ok(&["vm", "delete", vm]);
    }
}
