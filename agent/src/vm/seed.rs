//! cloud-init NoCloud seeds: how a VM booted from a real disk image learns its identity,
//! network and owner. The seed is a small FAT disk labelled `CIDATA` holding `meta-data`,
//! `user-data`, `vendor-data` and `network-config` (version 2), attached to the VM as its
//! last disk; cloud-init (and our test guest) finds it by its label.
//!
//! What Zhengyun writes meets what the owner gave by cloud-init's own rules, so that the
//! owner's document is never re-written (cloud-init reads YAML 1.1, where `0644` is octal
//! and `yes` is true: a re-emitted document could change meaning):
//!
//! - `meta-data`: the instance id, the host name and the owner's SSH keys as `public-keys`.
//!   cloud-init adds these keys to the document's own `ssh_authorized_keys` (both apply, to
//!   the image's default user); `allow_public_ssh_keys: false` in the document refuses them.
//! - `user-data`: the owner's `#cloud-config` document byte for byte, or an empty one.
//! - `vendor-data`: Zhengyun's defaults (host name, no password logins over SSH). The
//!   owner's document wins over it key by key; `vendor_data: {enabled: false}` drops it.
//! - `network-config`: the NICs, matched by MAC, with their addresses, the overlay's MTU,
//!   the zone's default route and name servers when it has them.
//!
//! Each seed is a FAT volume of its own: a random volume serial, and file times of when it
//! was written (UTC), not 1980.
//!
//! Everything Zhengyun writes comes from validated values (VM names are `a-z 0-9 -`,
//! addresses are typed, keys and search domains checked), and free text is quoted.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zy_common::guest::SshKey;
use zy_common::VmId;

/// The seed's file in the VM's directory.
pub const SEED_FILE: &str = "seed.img";
/// The label cloud-init's NoCloud source looks for.
pub const LABEL: &[u8; 11] = b"CIDATA     ";
/// Size of the seed disk: FAT12, room for far more than the four files (user-data is at
/// most 32 KiB).
pub const SIZE: u64 = 1024 * 1024;

/// One NIC as the guest must configure it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedNic {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
    pub nameservers: Vec<Ipv4Addr>,
    pub search: Vec<String>,
}

/// What a seed says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed {
    pub id: VmId,
    pub hostname: String,
    pub nics: Vec<SeedNic>,
    pub ssh_keys: Vec<SshKey>,
    /// The owner's `#cloud-config` document, as given.
    pub user_data: Option<String>,
}

fn mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A YAML double-quoted scalar.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A YAML flow list of plain scalars (addresses and checked domain names need no quotes).
fn flow(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(", "))
}

impl Seed {
    /// `meta-data`: the instance id (cloud-init runs its once-per-instance steps again when
    /// it changes, so it is the VM's id), the host name and the SSH keys.
    pub fn meta_data(&self) -> String {
        let mut s = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.id, self.hostname
        );
        if !self.ssh_keys.is_empty() {
            s.push_str("public-keys:\n");
            for k in &self.ssh_keys {
                s.push_str(&format!("  - {}\n", quoted(k.as_str())));
            }
        }
        s
    }

    /// `user-data`: the owner's document as given, or an empty cloud-config.
    pub fn user_data(&self) -> String {
        match &self.user_data {
            Some(u) => u.clone(),
            None => "#cloud-config\n".to_string(),
        }
    }

    /// `vendor-data`: Zhengyun's defaults, each overridden by the owner's user-data.
    pub fn vendor_data(&self) -> String {
        format!(
            "#cloud-config\n# Zhengyun's defaults: the VM's user-data overrides any of them.\n\
             hostname: {}\npreserve_hostname: false\nssh_pwauth: false\n",
            self.hostname
        )
    }

    /// `network-config`, version 2: each NIC matched by its MAC, static address, the
    /// overlay's MTU (VXLAN takes 50 bytes of the underlay's 1500), and the first NIC's
    /// default route and name servers when the zone has them.
    pub fn network_config(&self) -> String {
        let mut s = String::from("version: 2\nethernets:\n");
        for (i, n) in self.nics.iter().enumerate() {
            s.push_str(&format!(
                "  nic{i}:\n    match:\n      macaddress: \"{}\"\n    set-name: eth{i}\n    \
                 addresses:\n      - {}/{}\n    mtu: {}\n",
                mac(n.mac),
                n.ip,
                n.prefix,
                n.mtu
            ));
            if i != 0 {
                continue;
            }
            // One default route and one resolver configuration: the first NIC's.
            if let Some(gw) = n.gateway {
                s.push_str(&format!(
                    "    routes:\n      - to: 0.0.0.0/0\n        via: {gw}\n"
                ));
            }
            if !n.nameservers.is_empty() || !n.search.is_empty() {
                s.push_str("    nameservers:\n");
                if !n.nameservers.is_empty() {
                    let a = flow(n.nameservers.iter().map(|a| a.to_string()));
                    s.push_str(&format!("      addresses: {a}\n"));
                }
                if !n.search.is_empty() {
                    let d = flow(n.search.iter().cloned());
                    s.push_str(&format!("      search: {d}\n"));
                }
            }
        }
        s
    }

    /// The seed disk: a raw FAT12 image labelled `CIDATA`, with a serial of its own and
    /// file times of now, holding the four files.
    pub fn image(&self) -> std::io::Result<Vec<u8>> {
        let mut disk = std::io::Cursor::new(vec![0u8; SIZE as usize]);
        fatfs::format_volume(
            &mut disk,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat12)
                .volume_label(*LABEL)
                .volume_id(rand::random()),
        )?;
        {
            let fs = fatfs::FileSystem::new(
                &mut disk,
                fatfs::FsOptions::new().time_provider(&UtcClock),
            )?;
            for (name, text) in [
                ("meta-data", self.meta_data()),
                ("user-data", self.user_data()),
                ("vendor-data", self.vendor_data()),
                ("network-config", self.network_config()),
            ] {
                let mut f = fs.root_dir().create_file(name)?;
                f.truncate()?;
                f.write_all(text.as_bytes())?;
                f.flush()?;
            }
            fs.unmount()?;
        }
        Ok(disk.into_inner())
    }

    /// Writes the seed disk to `path` (atomically, replacing any earlier one).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        zy_common::files::write_atomic(path, &self.image()?, 0o600)
    }
}

/// The wall clock in UTC, for the FAT's file times (FAT has no time zone; UTC is what a
/// guest that mounts the seed with `tz=UTC` or reads it with cloud-init assumes least
/// wrongly). Clamped to FAT's years 1980 to 2107.
#[derive(Debug)]
struct UtcClock;

impl UtcClock {
    fn now() -> fatfs::DateTime {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        fat_time(secs as u64)
    }
}

/// A time (ms since the epoch) as FAT stores it, in UTC.
fn fat_time(ms: u64) -> fatfs::DateTime {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (date, time) = if year < 1980 {
        ((1980, 1, 1), (0, 0, 0, 0))
    } else if year > 2107 {
        ((2107, 12, 31), (23, 59, 59, 0))
    } else {
        (
            (year as u16, month as u16, day as u16),
            (
                (rem / 3600) as u16,
                (rem / 60 % 60) as u16,
                (rem % 60) as u16,
                (ms % 1000) as u16,
            ),
        )
    };
    fatfs::DateTime {
        date: fatfs::Date {
            year: date.0,
            month: date.1,
            day: date.2,
        },
        time: fatfs::Time {
            hour: time.0,
            min: time.1,
            sec: time.2,
            millis: time.3,
        },
    }
}

impl fatfs::TimeProvider for UtcClock {
    fn get_current_date(&self) -> fatfs::Date {
        Self::now().date
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        Self::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDKwxyYVhVBnDWR4OE6Ix9qctTrkxiKMI3txQaLpbjA/ ops@hz-a";

    fn seed() -> Seed {
        Seed {
            id: "6f1c2a8e-8e1b-4a59-9c47-2f4d1e0c9b11".parse().unwrap(),
            hostname: "web-1".into(),
            nics: vec![SeedNic {
                mac: [0x52, 0x54, 0, 0xab, 0xcd, 0xef],
                ip: Ipv4Addr::new(10, 220, 0, 7),
                prefix: 16,
                gateway: Some(Ipv4Addr::new(10, 220, 0, 1)),
                mtu: 1450,
                nameservers: vec![Ipv4Addr::new(10, 220, 0, 1), Ipv4Addr::new(192, 0, 2, 53)],
                search: vec!["hz-a.gov.internal".into()],
            }],
            ssh_keys: vec![SshKey::parse(KEY).unwrap()],
            user_data: Some("#cloud-config\npackages: [nginx]\nwrite_files:\n  - path: /etc/x\n    permissions: 0644\n".into()),
        }
    }

    #[test]
    fn network_config_is_version_2_matched_by_mac_with_route_and_name_servers() {
        let n = seed().network_config();
        assert_eq!(
            n,
            "version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: \"52:54:00:ab:cd:ef\"\n    \
             set-name: eth0\n    addresses:\n      - 10.220.0.7/16\n    mtu: 1450\n    routes:\n      \
             - to: 0.0.0.0/0\n        via: 10.220.0.1\n    nameservers:\n      \
             addresses: [10.220.0.1, 192.0.2.53]\n      search: [hz-a.gov.internal]\n"
        );
        // A zone without them: no route, no resolver.
        let mut bare = seed();
        bare.nics[0].gateway = None;
        bare.nics[0].nameservers.clear();
        bare.nics[0].search.clear();
        let n = bare.network_config();
        assert!(
            n.ends_with("    mtu: 1450\n") && !n.contains("routes") && !n.contains("nameservers"),
            "{n}"
        );
        // Name servers alone (a resolver inside the zone's subnet, no gateway).
        bare.nics[0].nameservers.push(Ipv4Addr::new(10, 220, 0, 53));
        assert!(bare
            .network_config()
            .ends_with("    mtu: 1450\n    nameservers:\n      addresses: [10.220.0.53]\n"));
    }

    #[test]
    fn keys_go_to_meta_data_and_the_owners_document_is_passed_on_untouched() {
        let s = seed();
        assert_eq!(
            s.meta_data(),
            format!(
                "instance-id: 6f1c2a8e-8e1b-4a59-9c47-2f4d1e0c9b11\nlocal-hostname: web-1\n\
                 public-keys:\n  - \"{KEY}\"\n"
            )
        );
        // Byte for byte: `0644` stays what YAML 1.1 reads as octal.
        assert_eq!(&s.user_data(), s.user_data.as_ref().unwrap());
        assert!(s.vendor_data().starts_with("#cloud-config\n"));
        assert!(s.vendor_data().contains("\nhostname: web-1\n"));
        assert!(s.vendor_data().contains("\nssh_pwauth: false\n"));
        let none = Seed {
            ssh_keys: vec![],
            user_data: None,
            ..seed()
        };
        assert!(!none.meta_data().contains("public-keys"));
        assert_eq!(none.user_data(), "#cloud-config\n");
        assert_eq!(quoted("a\"b\\c\u{1}"), "\"a\\\"b\\\\c\\u0001\"");
    }

    #[test]
    fn fat_times_are_utc_civil_dates() {
        let t = fat_time(1_767_225_599_500); // 2025-12-31T23:59:59.5Z
        assert_eq!((t.date.year, t.date.month, t.date.day), (2025, 12, 31));
        assert_eq!(
            (t.time.hour, t.time.min, t.time.sec, t.time.millis),
            (23, 59, 59, 500)
        );
        let t = fat_time(951_782_400_000); // 2000-02-29T00:00:00Z
        assert_eq!((t.date.year, t.date.month, t.date.day), (2000, 2, 29));
        assert_eq!(fat_time(0).date.year, 1980, "clamped to FAT's first year");
    }

    fn read(fs: &fatfs::FileSystem<std::fs::File>, name: &str) -> String {
        let mut text = String::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    #[test]
    fn the_seed_disk_is_a_cidata_fat_volume_of_its_own_holding_the_four_files() {
        let dir = std::env::temp_dir().join(format!("zy-seed-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("seed.img");
        let s = seed();
        s.write(&path).unwrap();
        let first = {
            let fs = fatfs::FileSystem::new(
                std::fs::File::open(&path).unwrap(),
                fatfs::FsOptions::new(),
            )
            .unwrap();
            fs.volume_id()
        };
        // Written twice (a VM re-created on the same node): replaced, not appended.
        s.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
        let file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        // Each seed has a serial of its own (2^-32 odds of a false failure).
        assert_ne!(fs.volume_id(), first, "two seeds share a volume serial");
        let this_year = (zy_common::time::now_millis() / 1000 / 86_400 / 365 + 1970) as u16;
        for (name, want) in [
            ("meta-data", s.meta_data()),
            ("user-data", s.user_data()),
            ("vendor-data", s.vendor_data()),
            ("network-config", s.network_config()),
        ] {
            assert_eq!(read(&fs, name), want, "{name}");
        }
        for e in fs.root_dir().iter() {
            let e = e.unwrap();
            let m = e.modified();
            // Real times: this year (give or take the new year), not 1980.
            assert!(
                m.date.year + 1 >= this_year && m.date.year <= this_year + 1,
                "{}: {m:?}",
                e.file_name()
            );
            assert!(e.created().date.year + 1 >= this_year);
        }
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
