//! Images and the blobs they are made of, named by BLAKE3 hash.

use serde::{Deserialize, Serialize};
use zy_common::blob::BlobHash;
use zy_common::image::{DiskFormat, ImageKind};
use zy_common::Zone;

/// `PUT /v1/blobs`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BlobView {
    pub hash: BlobHash,
    pub size: u64,
}

/// `POST /v1/images`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: String,
    /// A disk image: the blob holding it (its size is read from it).
    pub disk: Option<BlobHash>,
    /// The disk image's format as the uploader declares it: `qcow2` or `raw`. Required with
    /// `disk`; the image is inspected and refused if it is not what is declared.
    pub format: Option<DiskFormat>,
    /// A kernel image: the kernel's blob, and optionally an initramfs and a command line.
    pub kernel: Option<BlobHash>,
    /// The zone whose VMs may boot it...
    pub zone: Option<Zone>,
    /// ...or `true`: shared with both zones (a platform image). Exactly one of the two.
    #[serde(default)]
    pub shared: bool,
    pub initrd: Option<BlobHash>,
    pub cmdline: Option<String>,
}

/// An image as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageView {
    pub name: String,
    pub kind: ImageKind,
    pub size_bytes: u64,
    pub created_at: String,
    /// The zone whose VMs may boot it; absent for a shared image.
    pub zone: Option<Zone>,
    pub shared: bool,
    /// The VMs (not deleted) that boot from it, by name: while there are any it cannot be
    /// deleted.
    #[serde(default)]
    pub used_by: Vec<String>,
}
