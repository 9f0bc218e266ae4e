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

    /// Parses a name as the uploader declares it.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "qcow2" => Some(DiskFormat::Qcow2),
            "raw" => Some(DiskFormat::Raw),
            _ => None,
        }
    }
}

/// How many bytes of an image [`inspect`] needs: the qcow2 header and its extensions.
pub const INSPECT_BYTES: usize = 64 * 1024;

/// The largest virtual disk accepted.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// Why a disk image is refused. Images are inspected, not trusted: a qcow2 header can name
/// any host file as its backing file or data file, and QEMU would open it for the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("declared {declared} but the file is a {found} image: declare its real format")]
    FormatMismatch {
        declared: &'static str,
        found: &'static str,
    },
    #[error("a qcow2 image that names a backing file is refused (it would give the guest a host file); flatten it first: qemu-img convert -O qcow2 IN OUT")]
    BackingFile,
    #[error("a qcow2 image with an external data file is refused (it would give the guest a host file); convert it: qemu-img convert -O qcow2 IN OUT")]
    ExternalDataFile,
    #[error("an encrypted qcow2 image is refused: upload it decrypted (the VM's disk is protected by the node)")]
    Encrypted,
    #[error("the qcow2 image is marked corrupt; repair it with qemu-img check -r all")]
    Corrupt,
    #[error("the qcow2 header is not valid: {0}")]
    BadHeader(String),
    #[error(
        "the qcow2 image uses features this site does not know (incompatible feature bits {0:#x})"
    )]
    UnknownFeatures(u64),
    #[error("the disk image's virtual size of {0} bytes is not within 1 byte..=64 TiB")]
    BadSize(u64),
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The magic numbers of image formats QEMU would probe, so that a raw upload that is really
/// one of them is told apart.
fn probed_format(head: &[u8]) -> Option<&'static str> {
    let starts = |m: &[u8]| head.starts_with(m);
    if starts(b"QFI\xfb") {
        Some("qcow2")
    } else if starts(b"QED\0") {
        Some("qed")
    } else if starts(b"KDMV") || starts(b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if starts(b"vhdxfile") {
        Some("vhdx")
    } else if starts(b"conectix") {
        Some("vpc")
    } else if starts(b"LUKS\xba\xbe") {
        Some("luks")
    } else if head.len() >= 68 && be32(head, 64) == Some(0xbeda_107f) {
        Some("vdi")
    } else {
        None
    }
}

/// Inspects a disk image from its first bytes (at least [`INSPECT_BYTES`] or the whole
/// file) and its length, against the format its uploader declared, and returns its virtual
/// size. Pure: the coordinator runs it at import and every node again before first use.
pub fn inspect(head: &[u8], file_len: u64, declared: DiskFormat) -> Result<u64, ImageError> {
    let found = probed_format(head);
    match declared {
        DiskFormat::Raw => match found {
            Some(f) => Err(ImageError::FormatMismatch {
                declared: "raw",
                found: f,
            }),
            None if file_len == 0 || file_len > MAX_VIRTUAL_SIZE => {
                Err(ImageError::BadSize(file_len))
            }
            None => Ok(file_len),
        },
        DiskFormat::Qcow2 => {
            if found != Some("qcow2") {
                return Err(ImageError::FormatMismatch {
                    declared: "qcow2",
                    found: found.unwrap_or("raw"),
                });
            }
            inspect_qcow2(head)
        }
    }
}

fn inspect_qcow2(h: &[u8]) -> Result<u64, ImageError> {
    let bad = |m: &str| ImageError::BadHeader(m.to_string());
    let version = be32(h, 4).ok_or_else(|| bad("truncated"))?;
    if !(2..=3).contains(&version) {
        return Err(bad(&format!("version {version} (2 or 3 expected)")));
    }
    let backing_offset = be64(h, 8).ok_or_else(|| bad("truncated"))?;
    let backing_size = be32(h, 16).ok_or_else(|| bad("truncated"))?;
    if backing_offset != 0 || backing_size != 0 {
        return Err(ImageError::BackingFile);
    }
    let cluster_bits = be32(h, 20).ok_or_else(|| bad("truncated"))?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(&format!("cluster bits {cluster_bits}")));
    }
    let size = be64(h, 24).ok_or_else(|| bad("truncated"))?;
    if size == 0 || size > MAX_VIRTUAL_SIZE {
        return Err(ImageError::BadSize(size));
    }
    if be32(h, 32).ok_or_else(|| bad("truncated"))? != 0 {
        return Err(ImageError::Encrypted);
    }
    let (ext_start, end) = if version == 3 {
        let incompatible = be64(h, 72).ok_or_else(|| bad("truncated"))?;
        if incompatible & 0b10 != 0 {
            return Err(ImageError::Corrupt);
        }
        if incompatible & 0b100 != 0 {
            return Err(ImageError::ExternalDataFile);
        }
        // Known: dirty, corrupt, data file, compression type, extended L2.
        if incompatible & !0b1_1111 != 0 {
            return Err(ImageError::UnknownFeatures(incompatible & !0b1_1111));
        }
        let header_len = be32(h, 100).ok_or_else(|| bad("truncated"))? as usize;
        if !(104..=h.len()).contains(&header_len) {
            return Err(bad(&format!("header length {header_len}")));
        }
        (header_len, 1usize << cluster_bits)
    } else {
        (72, 1usize << cluster_bits)
    };
    // Header extensions, up to the end of the first cluster (or what we were given).
    let end = end.min(h.len());
    let mut at = ext_start;
    loop {
        let (Some(kind), Some(len)) = (be32(h, at), be32(h, at + 4)) else {
            return Err(bad("header extensions run past the first cluster"));
        };
        let len = len as usize;
        match kind {
            0 => break,
            // External data file name.
            0x4441_5441 => return Err(ImageError::ExternalDataFile),
            // Full disk encryption header.
            0x0537_be77 => return Err(ImageError::Encrypted),
            _ => {}
        }
        at = at
            .checked_add(8)
            .and_then(|a| a.checked_add(len.div_ceil(8) * 8))
            .filter(|a| *a <= end)
            .ok_or_else(|| bad("a header extension runs past the first cluster"))?;
    }
    Ok(size)
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

    /// A minimal, valid qcow2 v3 header of `size` bytes with 64 KiB clusters.
    fn qcow2(size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    #[test]
    fn a_clean_qcow2_and_a_raw_image_pass() {
        assert_eq!(
            inspect(&qcow2(1 << 30), 4096, DiskFormat::Qcow2),
            Ok(1 << 30)
        );
        assert_eq!(
            inspect(b"\x7fELF plain bytes", 4096, DiskFormat::Raw),
            Ok(4096)
        );
    }

    /// Review finding 4: a backing file or data file named in the header was followed.
    #[test]
    fn backing_files_data_files_encryption_and_lies_are_refused() {
        let mut h = qcow2(1 << 30);
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        assert_eq!(
            inspect(&h, 4096, DiskFormat::Qcow2),
            Err(ImageError::BackingFile)
        );
        let mut h = qcow2(1 << 30);
        h[72..80].copy_from_slice(&4u64.to_be_bytes());
        assert_eq!(
            inspect(&h, 4096, DiskFormat::Qcow2),
            Err(ImageError::ExternalDataFile)
        );
        let mut h = qcow2(1 << 30);
        // A data file name extension without the feature bit.
        h[112..116].copy_from_slice(&0x4441_5441u32.to_be_bytes());
        h[116..120].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            inspect(&h, 4096, DiskFormat::Qcow2),
            Err(ImageError::ExternalDataFile)
        );
        let mut h = qcow2(1 << 30);
        h[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            inspect(&h, 4096, DiskFormat::Qcow2),
            Err(ImageError::Encrypted)
        );
        let mut h = qcow2(1 << 30);
        h[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(
            inspect(&h, 4096, DiskFormat::Qcow2),
            Err(ImageError::UnknownFeatures(_))
        ));
        // A raw image that starts with the qcow2 magic is not taken for qcow2.
        assert!(matches!(
            inspect(&qcow2(1 << 30), 4096, DiskFormat::Raw),
            Err(ImageError::FormatMismatch { found: "qcow2", .. })
        ));
        assert!(matches!(
            inspect(b"plain", 5, DiskFormat::Qcow2),
            Err(ImageError::FormatMismatch { found: "raw", .. })
        ));
        assert!(matches!(
            inspect(&qcow2(0), 4096, DiskFormat::Qcow2),
            Err(ImageError::BadSize(0))
        ));
    }

    proptest::proptest! {
        /// Whatever the bytes, inspection answers and never panics.
        #[test]
        fn inspection_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            at in 0usize..4096,
            qcow in proptest::prelude::any::<bool>(),
        ) {
            let mut h = if qcow { qcow2(1 << 20) } else { Vec::new() };
            let at = at.min(h.len());
            h.splice(at..(at + bytes.len()).min(h.len()), bytes.iter().copied());
            let _ = inspect(&h, h.len() as u64, DiskFormat::Qcow2);
            let _ = inspect(&h, h.len() as u64, DiskFormat::Raw);
        }
    }
}
