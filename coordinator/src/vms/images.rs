//! Images over the API: blobs are uploaded as raw bodies and named by their BLAKE3 hash;
//! an image names one or more blobs and says how they boot.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use futures_util::StreamExt;
use tracing::info;
use zy_api::{BlobView, CreateImage, ImageView};
use zy_common::blob::{BlobError, BlobHash};
use zy_common::image::ImageKind;
use zy_common::time::{now_millis, rfc3339};

use crate::api::ApiError;
use crate::store::ImageRecord;
use crate::Coordinator;

/// The largest blob accepted (an image file).
pub const MAX_BLOB: u64 = 64 << 30;

fn view(r: &ImageRecord, users: &HashMap<String, Vec<String>>) -> ImageView {
    ImageView {
        name: r.name.clone(),
        kind: r.kind.clone(),
        size_bytes: r.size_bytes,
        created_at: rfc3339(r.created_at_ms),
        zone: r.zone,
        shared: r.zone.is_none(),
        used_by: users.get(&r.name).cloned().unwrap_or_default(),
    }
}

/// The VMs (not deleted) of each image, by name, sorted.
fn image_users(coord: &Coordinator) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = coord.vms.with(|t| {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for v in t
            .vms
            .values()
            .filter(|v| v.desired != zy_api::VmDesired::Deleted)
        {
            m.entry(v.image.clone()).or_default().push(v.name.clone());
        }
        m
    });
    m.values_mut().for_each(|v| v.sort());
    m
}

fn blob_err(e: BlobError) -> ApiError {
    match e {
        BlobError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
        }
        other => ApiError::internal(other),
    }
}

/// Streams a request body into the blob store.
pub async fn put_blob(
    State(coord): State<Arc<Coordinator>>,
    body: Body,
) -> Result<(StatusCode, Json<BlobView>), ApiError> {
    let mut writer = coord.blobs.writer(MAX_BLOB).map_err(blob_err)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the upload broke off: {e}")))?;
        tokio::task::block_in_place(|| writer.write(&chunk)).map_err(blob_err)?;
    }
    if writer.is_empty() {
        return Err(ApiError::bad_request("an empty blob is not an image"));
    }
    let (hash, size) = tokio::task::block_in_place(|| writer.finish(None)).map_err(blob_err)?;
    info!(%hash, size, "blob stored");
    Ok((StatusCode::CREATED, Json(BlobView { hash, size })))
}

pub async fn list_images(
    State(coord): State<Arc<Coordinator>>,
) -> Result<Json<Vec<ImageView>>, ApiError> {
    let store = coord.store.clone();
    let images = tokio::task::spawn_blocking(move || store.images())
        .await
        .map_err(ApiError::internal)??;
    let users = image_users(&coord);
    Ok(Json(images.iter().map(|i| view(i, &users)).collect()))
}

pub async fn show_image(
    State(coord): State<Arc<Coordinator>>,
    Path(name): Path<String>,
) -> Result<Json<ImageView>, ApiError> {
    let store = coord.store.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || store.image(&n))
        .await
        .map_err(ApiError::internal)??
        .map(|r| Json(view(&r, &image_users(&coord))))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no image `{}`; `zy image ls` lists them",
                zy_common::ids::truncate_for_error(&name)
            ))
        })
}

pub async fn create_image(
    State(coord): State<Arc<Coordinator>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ImageView>), ApiError> {
    let req: CreateImage = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad image request: {e}")))?;
    zy_common::ids::validate_name_of("image", &req.name)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let zone = match (req.zone, req.shared) {
        (Some(z), false) => Some(z),
        (None, true) => None,
        _ => {
            return Err(ApiError::bad_request(
                "say whose the image is: `zone` (extranet or intranet), or `shared: true` for both zones",
            ))
        }
    };
    let need = |h: BlobHash| -> Result<u64, ApiError> {
        coord.blobs.size(&h).ok_or_else(|| {
            ApiError::bad_request(format!(
                "blob {h} is not stored here: upload it first (PUT /v1/blobs)"
            ))
        })
    };
    let (kind, size) = match (&req.disk, &req.kernel) {
        (Some(disk), None) => {
            if req.initrd.is_some() || req.cmdline.is_some() {
                return Err(ApiError::bad_request(
                    "initrd and cmdline go with a kernel image, not a disk image",
                ));
            }
            let format = req.format.ok_or_else(|| {
                ApiError::bad_request("a disk image needs its `format` declared: qcow2 or raw")
            })?;
            let len = need(*disk)?;
            let path = coord.blobs.path(disk);
            let head = tokio::task::spawn_blocking(move || read_head(&path))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?;
            // Inspected, not trusted: a header that names a host file is refused.
            let virtual_size = zy_common::image::inspect(&head, len, format)
                .map_err(|e| ApiError::bad_request(format!("image refused: {e}")))?;
            (
                ImageKind::Disk {
                    blob: *disk,
                    format,
                    virtual_size,
                },
                len,
            )
        }
        (None, Some(kernel)) => {
            if req.format.is_some() {
                return Err(ApiError::bad_request(
                    "format goes with a disk image, not a kernel image",
                ));
            }
            let mut size = need(*kernel)?;
            if let Some(i) = req.initrd {
                size += need(i)?;
            }
            let cmdline = req.cmdline.clone().unwrap_or_default();
            if cmdline.len() > 2048 || cmdline.chars().any(char::is_control) {
                return Err(ApiError::bad_request(
                    "the command line must be under 2 KiB of printable text",
                ));
            }
            (
                ImageKind::Kernel {
                    kernel: *kernel,
                    initrd: req.initrd,
                    cmdline,
                },
                size,
            )
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `disk` (a disk image) or `kernel` (a kernel image)",
            ))
        }
    };
    let rec = ImageRecord {
        name: req.name.clone(),
        kind,
        size_bytes: size,
        created_at_ms: now_millis(),
        zone,
    };
    let store = coord.store.clone();
    let r = rec.clone();
    let inserted = tokio::task::spawn_blocking(move || store.insert_image(&r))
        .await
        .map_err(ApiError::internal)??;
    if !inserted {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!(
                "an image named `{}` exists; pick another name or delete it first",
                req.name
            ),
        ));
    }
    info!(name = %rec.name, "image created");
    Ok((StatusCode::CREATED, Json(view(&rec, &HashMap::new()))))
}

/// The first bytes of a blob, as many as inspection needs.
pub fn read_head(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(zy_common::image::INSPECT_BYTES);
    std::fs::File::open(path)?
        .take(zy_common::image::INSPECT_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

pub async fn delete_image(
    State(coord): State<Arc<Coordinator>>,
    Path(name): Path<String>,
) -> Result<Json<ImageView>, ApiError> {
    // VMs boot from it (and their nodes fetch it again after a cache loss): not while used.
    let mut users: Vec<String> = coord.vms.with(|t| {
        t.vms
            .values()
            .filter(|v| v.image == name && v.desired != zy_api::VmDesired::Deleted)
            .map(|v| v.name.clone())
            .collect()
    });
    if !users.is_empty() {
        users.sort();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "image_in_use",
            format!(
                "image {} is used by {} VM(s): {}; delete them first",
                zy_common::ids::truncate_for_error(&name),
                users.len(),
                users.join(", ")
            ),
        ));
    }
    let store = coord.store.clone();
    let n = name.clone();
    let rec = tokio::task::spawn_blocking(move || store.remove_image(&n))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no image `{}`",
                zy_common::ids::truncate_for_error(&name)
            ))
        })?;
    // Blobs still named by another image stay.
    let store = coord.store.clone();
    let others = tokio::task::spawn_blocking(move || store.images())
        .await
        .map_err(ApiError::internal)??;
    for b in rec.kind.blobs() {
        if !others.iter().any(|o| o.kind.blobs().contains(&b)) {
            coord.blobs.remove(&b).map_err(blob_err)?;
        }
    }
    info!(name = %rec.name, "image deleted");
    Ok(Json(view(&rec, &HashMap::new())))
}
