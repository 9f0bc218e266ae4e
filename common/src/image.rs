//! Images: what a VM boots from. Stored at the coordinator as content-addressed blobs, fetched
//! by nodes by hash and verified.

use serde::{Deserialize, Serialize};

use crate::blob::BlobHash;

/// A disk image's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }

    /// The format and virtual size of a disk image from its first bytes and its length:
    /// qcow2 by its magic and header, anything else is raw.
    pub fn sniff(head: &[u8], file_len: u64) -> (DiskFormat, u64) {
        if head.len() >= 32 && head[..4] == *b"QFI\xfb" {
            let mut size = [0u8; 8];
            size.copy_from_slice(&head[24..32]);
            (DiskFormat::Qcow2, u64::from_be_bytes(size))
        } else {
            (DiskFormat::Raw, file_len)
        }
    }
}

/// How an image boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// A bootable disk; each VM gets a qcow2 overlay on it.
    Disk {
        blob: BlobHash,
        format: DiskFormat,
        virtual_size: u64,
    },
    /// A kernel (and initramfs) booted directly, with a base command line.
    Kernel {
        kernel: BlobHash,
        initrd: Option<BlobHash>,
        cmdline: String,
    },
}

impl ImageKind {
    /// Every blob the image needs.
    pub fn blobs(&self) -> Vec<BlobHash> {
        match self {
            ImageKind::Disk { blob, .. } => vec![*blob],
            ImageKind::Kernel { kernel, initrd, .. } => {
                let mut v = vec![*kernel];
                v.extend(initrd);
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records and frames are postcard: every variant must round-trip through it (an
    /// internally tagged serde enum would not).
    #[test]
    fn kinds_round_trip_through_postcard_and_json() {
        let kinds = [
            ImageKind::Disk {
                blob: BlobHash([1; 32]),
                format: DiskFormat::Qcow2,
                virtual_size: 5,
            },
            ImageKind::Kernel {
                kernel: BlobHash([2; 32]),
                initrd: None,
                cmdline: "x".into(),
            },
        ];
        for k in kinds {
            let b = postcard::to_allocvec(&k).unwrap();
            assert_eq!(postcard::from_bytes::<ImageKind>(&b).unwrap(), k);
        }
        for st in [
            crate::vm::VmState::Running,
            crate::vm::VmState::Failed("why".into()),
        ] {
            let b = postcard::to_allocvec(&st).unwrap();
            assert_eq!(postcard::from_bytes::<crate::vm::VmState>(&b).unwrap(), st);
        }
    }

    #[test]
    fn sniffs_qcow2_and_raw() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        assert_eq!(DiskFormat::sniff(&h, 999), (DiskFormat::Qcow2, 1 << 30));
        assert_eq!(DiskFormat::sniff(b"\x7fELF", 4), (DiskFormat::Raw, 4));
    }
}
