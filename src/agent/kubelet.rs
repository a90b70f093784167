//! Kubernetes pods' namespace and name from the kubelet's pod-resources socket
//! (`--owners.kubelet-socket`, API `v1.PodResourcesLister/List`, gRPC over a Unix socket).
//!
//! The API lists pods by namespace and name with the devices of their containers, not by
//! UID, so a pod found through a process's cgroup (whose id is its UID) is joined to it by
//! the GPU the process runs on: the device ids of `nvidia.com/*` resources are GPU UUIDs
//! (time-sliced replicas are `GPU-…::N`; the `::N` is dropped). A GPU that several pods
//! list is ambiguous and names nobody.
//!
//! [`refresh_loop`] runs on the tokio runtime, never on the sampling thread: it refreshes
//! [`PodNames`] every 30 s, and sooner (at most every 5 s) when the sampler asks
//! ([`PodNames::want_refresh`]). The sampler only reads the last map under a lock.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::body::Incoming;

/// The request of `List` (no fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesRequest {}

/// The answer of `List` (only the fields read here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodResourcesResponse {
    #[prost(message, repeated, tag = "1")]
    pub pod_resources: Vec<PodResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(message, repeated, tag = "3")]
    pub containers: Vec<ContainerResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerResources {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<ContainerDevices>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerDevices {
    #[prost(string, tag = "1")]
    pub resource_name: String,
    #[prost(string, repeated, tag = "2")]
    pub device_ids: Vec<String>,
}

/// The gRPC method's path.
pub const LIST_PATH: &str = "/v1.PodResourcesLister/List";

/// The largest answer read (a node's pods and devices fit in far less).
const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// A pod's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName {
    pub namespace: String,
    pub pod: String,
}

/// What the last map says of a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnGpu {
    /// Exactly one pod lists the GPU.
    Pod(PodName),
    /// Several pods list it (time-slicing, sharing): nobody is named.
    Ambiguous,
    /// No pod lists it.
    Unlisted,
}

/// The pod of each GPU UUID in an answer: `Some` where exactly one pod lists it, `None`
/// where several do. Only `nvidia.com/*` resources count; `GPU-…::N` is `GPU-…`.
pub fn gpu_pods(resp: &ListPodResourcesResponse) -> HashMap<String, Option<PodName>> {
    let mut by_gpu: HashMap<String, BTreeSet<PodName>> = HashMap::new();
    for p in &resp.pod_resources {
        let name = PodName {
            namespace: crate::agent::procfs::clean(&p.namespace),
            pod: crate::agent::procfs::clean(&p.name),
        };
        for c in &p.containers {
            for d in &c.devices {
                if !d.resource_name.starts_with("nvidia.com/") {
                    continue;
                }
                for id in &d.device_ids {
                    let uuid = id.split_once("::").map_or(id.as_str(), |(u, _)| u);
                    if uuid.is_empty() {
                        continue;
                    }
                    by_gpu
                        .entry(uuid.to_string())
                        .or_default()
                        .insert(name.clone());
                }
            }
        }
    }
    by_gpu
        .into_iter()
        .map(|(uuid, pods)| {
            let one = (pods.len() == 1).then(|| pods.into_iter().next()).flatten();
            (uuid, one)
        })
        .collect()
}

#[derive(Debug, Default)]
struct Map {
    gpus: HashMap<String, Option<PodName>>,
    /// The number of the request this map answers (0: none yet).
    seq: u64,
}

/// The last map of GPUs to pods, shared between the refresher and the sampler.
#[derive(Debug, Default)]
pub struct PodNames {
    map: RwLock<Map>,
    /// Requests started so far.
    started: AtomicU64,
    wanted: tokio::sync::Notify,
}

impl PodNames {
    /// The number of requests started so far: a map answering a later request was asked
    /// for after this call.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// What the last map says of GPU `uuid`, and the number of the request it answers.
    pub fn on_gpu(&self, uuid: &str) -> (u64, OnGpu) {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let on = match map.gpus.get(uuid) {
            Some(Some(p)) => OnGpu::Pod(p.clone()),
            Some(None) => OnGpu::Ambiguous,
            None => OnGpu::Unlisted,
        };
        (map.seq, on)
    }

    /// Asks the refresher for a new map soon (at most every 5 s); never blocks.
    pub fn want_refresh(&self) {
        self.wanted.notify_one();
    }

    fn begin(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn publish(&self, seq: u64, gpus: HashMap<String, Option<PodName>>) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        *map = Map { gpus, seq };
    }
}

/// Why a `List` call gave no map.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("socket not found")]
    Absent,
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP/2: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("gRPC status {0}: {1}")]
    Grpc(String, String),
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// Calls `List` on the socket at `socket`, all within `timeout`.
pub async fn list(socket: &Path, timeout: Duration) -> Result<ListPodResourcesResponse, ListError> {
    match tokio::time::timeout(timeout, list_inner(socket)).await {
        Ok(r) => r,
        Err(_) => Err(ListError::Timeout(timeout)),
    }
}

async fn list_inner(socket: &Path) -> Result<ListPodResourcesResponse, ListError> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ListError::Absent),
        Err(e) => return Err(ListError::Connect(e)),
    };
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| ListError::Http(e.to_string()))?;
    // Ended when this call ends, also when the caller's timeout drops it mid-way.
    let _conn = AbortOnDrop(tokio::spawn(conn));
    async {
        // An empty request message: uncompressed, length 0.
        let req = hyper::Request::post(format!("http://localhost{LIST_PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .map_err(|e| ListError::Http(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ListError::Http(e.to_string()))?;
        read_response(resp).await
    }
    .await
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_response(
    resp: hyper::Response<Incoming>,
) -> Result<ListPodResourcesResponse, ListError> {
    if resp.status() != hyper::StatusCode::OK {
        return Err(ListError::Status(resp.status().as_u16()));
    }
    let (parts, body) = resp.into_parts();
    // A trailers-only answer carries grpc-status in its headers.
    grpc_status(&parts.headers)?;
    let collected = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| ListError::Http(e.to_string()))?;
    if let Some(t) = collected.trailers() {
        grpc_status(t)?;
    }
    decode_frame(&collected.to_bytes())
}

fn grpc_status(headers: &hyper::HeaderMap) -> Result<(), ListError> {
    match headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None | Some("0") => Ok(()),
        Some(code) => Err(ListError::Grpc(
            code.to_string(),
            headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect(),
        )),
    }
}

/// The message in a gRPC body: one uncompressed frame (flag 0, 4-byte big-endian length).
/// An empty body is an empty answer.
pub fn decode_frame(body: &[u8]) -> Result<ListPodResourcesResponse, ListError> {
    if body.is_empty() {
        return Ok(ListPodResourcesResponse::default());
    }
    let Some((head, rest)) = body.split_first_chunk::<5>() else {
        return Err(ListError::Malformed("short gRPC frame".into()));
    };
    if head[0] != 0 {
        return Err(ListError::Malformed("compressed gRPC frame".into()));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if rest.len() != len {
        return Err(ListError::Malformed(format!(
            "gRPC frame of {len} bytes in a body of {}",
            rest.len()
        )));
    }
    prost::Message::decode(rest).map_err(|e| ListError::Malformed(e.to_string()))
}

/// How often [`refresh_loop`] asks the kubelet.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    /// Between refreshes when nobody asks.
    pub every: Duration,
    /// The least time between refreshes, however often the sampler asks.
    pub min_gap: Duration,
    /// A call's limit.
    pub timeout: Duration,
}

impl Default for Cadence {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(30),
            min_gap: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Unknown,
    Absent,
    Ok,
    Failing,
}

/// Refreshes `names` from the socket at `socket` forever (see the module doc). Logs state
/// changes only: the socket missing (info), failing (warn), answering (info). Every failed
/// call but a missing socket adds 1 to `errors`.
pub async fn refresh_loop(
    socket: PathBuf,
    names: std::sync::Arc<PodNames>,
    cadence: Cadence,
    errors: prometheus::Counter,
) {
    let mut health = Health::Unknown;
    loop {
        let seq = names.begin();
        let now = match list(&socket, cadence.timeout).await {
            Ok(resp) => {
                let gpus = gpu_pods(&resp);
                if health != Health::Ok {
                    tracing::info!(
                        socket = %socket.display(),
                        pods = resp.pod_resources.len(),
                        gpus = gpus.len(),
                        "reading pods' names from the kubelet pod-resources socket"
                    );
                }
                names.publish(seq, gpus);
                Health::Ok
            }
            Err(ListError::Absent) => {
                if health != Health::Absent {
                    tracing::info!(
                        socket = %socket.display(),
                        "kubelet pod-resources socket not found; pods are known by UID"
                    );
                }
                names.publish(seq, HashMap::new());
                Health::Absent
            }
            Err(e) => {
                errors.inc();
                if health != Health::Failing {
                    tracing::warn!(
                        socket = %socket.display(),
                        error = %e,
                        "cannot list pods from the kubelet pod-resources socket; new pods are known by UID until it answers"
                    );
                }
                Health::Failing
            }
        };
        health = now;
        tokio::time::sleep(cadence.min_gap).await;
        tokio::select! {
            () = tokio::time::sleep(cadence.every.saturating_sub(cadence.min_gap)) => {}
            () = names.wanted.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, devs: &[(&str, &[&str])]) -> PodResources {
        PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers: vec![ContainerResources {
                name: "main".into(),
                devices: devs
                    .iter()
                    .map(|(r, ids)| ContainerDevices {
                        resource_name: (*r).into(),
                        device_ids: ids.iter().map(|s| (*s).into()).collect(),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn gpus_map_to_their_only_pod_and_shared_ones_to_nobody() {
        let resp = ListPodResourcesResponse {
            pod_resources: vec![
                pod("ml", "train-0", &[("nvidia.com/gpu", &["GPU-a", "GPU-b"])]),
                pod("ml", "infer-0", &[("nvidia.com/gpu.shared", &["GPU-c::0"])]),
                pod(
                    "web",
                    "infer-1",
                    &[("nvidia.com/gpu.shared", &["GPU-c::1"])],
                ),
                pod(
                    "ml",
                    "replica",
                    &[("nvidia.com/gpu", &["GPU-d::3", "GPU-d::4"])],
                ),
                pod("x", "nic", &[("example.com/nic", &["GPU-e"])]),
            ],
        };
        let m = gpu_pods(&resp);
        let name = |ns: &str, p: &str| {
            Some(PodName {
                namespace: ns.into(),
                pod: p.into(),
            })
        };
        assert_eq!(m["GPU-a"], name("ml", "train-0"));
        assert_eq!(m["GPU-b"], name("ml", "train-0"));
        assert_eq!(m["GPU-c"], None);
        assert_eq!(m["GPU-d"], name("ml", "replica"));
        assert!(!m.contains_key("GPU-e"));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn frames_decode_and_garbage_is_an_error() {
        assert_eq!(
            decode_frame(&[]).unwrap(),
            ListPodResourcesResponse::default()
        );
        assert!(decode_frame(&[0, 0, 0]).is_err());
        assert!(decode_frame(&[1, 0, 0, 0, 0]).is_err());
        assert!(decode_frame(&[0, 0, 0, 0, 9, 1]).is_err());
        assert!(decode_frame(&[0, 0, 0, 0, 2, 0xff, 0xff]).is_err());
    }
}
