//! cloud-init NoCloud seeds: how a VM booted from a real disk image learns its identity and
//! network. The seed is a small FAT disk labelled `CIDATA` holding `meta-data`, `user-data`
//! and `network-config` (version 2), attached to the VM as its last disk; cloud-init (and
//! our test guest) finds it by its label.
//!
//! Everything written comes from validated values (VM names are `a-z 0-9 -`, addresses are
//! typed), so the YAML needs no quoting beyond what is written here.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use zy_common::VmId;

/// The label cloud-init's NoCloud source looks for.
pub const LABEL: &[u8; 11] = b"CIDATA     ";
/// Size of the seed disk: FAT12, room for far more than three small files.
const SIZE: u64 = 1024 * 1024;

/// One NIC as the guest must configure it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedNic {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
}

/// What a seed says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub id: VmId,
    pub hostname: String,
    pub nics: Vec<SeedNic>,
}

fn mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl Seed {
    /// `meta-data`: the instance id (cloud-init runs its once-per-instance steps again when
    /// it changes, so it is the VM's id) and the host name.
    pub fn meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.id, self.hostname
        )
    }

    /// `user-data`: nothing to run yet, but a valid cloud-config.
    pub fn user_data(&self) -> String {
        format!(
            "#cloud-config\nhostname: {}\npreserve_hostname: false\n",
            self.hostname
        )
    }

    /// `network-config`, version 2: each NIC matched by its MAC, static address, the
    /// overlay's MTU (VXLAN takes 50 bytes of the underlay's 1500).
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
            // One default route: the first NIC's.
            if let (0, Some(gw)) = (i, n.gateway) {
                s.push_str(&format!(
                    "    routes:\n      - to: 0.0.0.0/0\n        via: {gw}\n"
                ));
            }
        }
        s
    }

    /// The seed disk: a raw FAT12 image labelled `CIDATA` holding the three files.
    pub fn image(&self) -> std::io::Result<Vec<u8>> {
        let mut disk = std::io::Cursor::new(vec![0u8; SIZE as usize]);
        fatfs::format_volume(
            &mut disk,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat12)
                .volume_label(*LABEL),
        )?;
        {
            let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
            for (name, text) in [
                ("meta-data", self.meta_data()),
                ("user-data", self.user_data()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

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
            }],
        }
    }

    #[test]
    fn network_config_is_version_2_matched_by_mac() {
        let n = seed().network_config();
        assert_eq!(
            n,
            "version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: \"52:54:00:ab:cd:ef\"\n    \
             set-name: eth0\n    addresses:\n      - 10.220.0.7/16\n    mtu: 1450\n    routes:\n      \
             - to: 0.0.0.0/0\n        via: 10.220.0.1\n"
        );
        assert!(seed()
            .meta_data()
            .starts_with("instance-id: 6f1c2a8e-8e1b-4a59-9c47-2f4d1e0c9b11\n"));
        assert!(seed().user_data().starts_with("#cloud-config\n"));
    }

    #[test]
    fn the_seed_disk_is_a_cidata_fat_volume_holding_the_three_files() {
        let dir = std::env::temp_dir().join(format!("zy-seed-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("seed.img");
        let s = seed();
        s.write(&path).unwrap();
        // Written twice (a VM re-created on the same node): replaced, not appended.
        s.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
        let file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let root = fs.root_dir();
        for (name, want) in [
            ("meta-data", s.meta_data()),
            ("user-data", s.user_data()),
            ("network-config", s.network_config()),
        ] {
            let mut text = String::new();
            root.open_file(name)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            assert_eq!(text, want, "{name}");
        }
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
