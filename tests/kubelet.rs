//! The kubelet pod-resources client against a fake kubelet: a hyper HTTP/2 server on a
//! Unix socket in a temp dir answering `/v1.PodResourcesLister/List` with a
//! prost-encoded answer (or garbage), and [`Owners::owner_on`] naming a pod found in a
//! fixture procfs through the refresher's map; and the real agent on the fake NVML with
//! pod processes and the fake kubelet exporting `commitmeter_gpu_owner_info` with the
//! pod's namespace and name.

// Tests read the clock as they please: clippy.toml keeps that to src/clock.rs in the
// product only.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use commitmeter::agent::kubelet::{self, *};
use commitmeter::agent::procfs::{Owners, OwnersConfig};
use commitmeter::owner::OwnerKind;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

#[derive(Clone)]
enum Answer {
    Pods(ListPodResourcesResponse),
    Garbage,
    GrpcError,
}

/// Serves `answer` on a new socket `dir/kubelet.sock`; returns its path.
async fn fake_kubelet(dir: &Path, answer: Answer) -> PathBuf {
    let path = dir.join("kubelet.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let answer = answer.clone();
                    async move {
                        assert_eq!(req.uri().path(), kubelet::LIST_PATH);
                        let mut trailers = hyper::HeaderMap::new();
                        let body = match answer {
                            Answer::Pods(resp) => {
                                let msg = prost::Message::encode_to_vec(&resp);
                                let mut body = vec![0u8];
                                body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                                body.extend_from_slice(&msg);
                                trailers.insert("grpc-status", "0".parse().unwrap());
                                body
                            }
                            Answer::Garbage => b"<html>not gRPC</html>".to_vec(),
                            Answer::GrpcError => {
                                trailers.insert("grpc-status", "12".parse().unwrap());
                                trailers.insert("grpc-message", "unimplemented".parse().unwrap());
                                Vec::new()
                            }
                        };
                        let body = Full::new(Bytes::from(body))
                            .with_trailers(async move { Some(Ok(trailers)) });
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    path
}

fn pod(ns: &str, name: &str, resource: &str, ids: &[&str]) -> PodResources {
    PodResources {
        name: name.into(),
        namespace: ns.into(),
        containers: vec![ContainerResources {
            name: "main".into(),
            devices: vec![ContainerDevices {
                resource_name: resource.into(),
                device_ids: ids.iter().map(|s| (*s).into()).collect(),
            }],
        }],
    }
}

fn pods() -> ListPodResourcesResponse {
    ListPodResourcesResponse {
        pod_resources: vec![
            pod("ml", "train-0", "nvidia.com/gpu", &["GPU-a"]),
            pod("ml", "infer-0", "nvidia.com/gpu.shared", &["GPU-c::0"]),
            pod("web", "infer-1", "nvidia.com/gpu.shared", &["GPU-c::1"]),
            pod("ml", "replica", "nvidia.com/gpu", &["GPU-d::3"]),
        ],
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_come_from_the_only_pod_listing_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let socket = fake_kubelet(dir.path(), Answer::Pods(pods())).await;
    let resp = kubelet::list(&socket, TIMEOUT).await.unwrap();
    assert_eq!(resp, pods());
    let m = gpu_pods(&resp);
    let name = |ns: &str, p: &str| {
        Some(PodName {
            namespace: ns.into(),
            pod: p.into(),
        })
    };
    assert_eq!(m["GPU-a"], name("ml", "train-0"));
    assert_eq!(m["GPU-c"], None, "two pods share GPU-c: nobody is named");
    assert_eq!(
        m["GPU-d"],
        name("ml", "replica"),
        "the ::N of a replica is dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_or_a_bad_answer_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.sock");
    assert!(matches!(
        kubelet::list(&missing, TIMEOUT).await,
        Err(ListError::Absent)
    ));
    let garbage = tempfile::tempdir().unwrap();
    let socket = fake_kubelet(garbage.path(), Answer::Garbage).await;
    assert!(matches!(
        kubelet::list(&socket, TIMEOUT).await,
        Err(ListError::Malformed(_))
    ));
    let failing = tempfile::tempdir().unwrap();
    let socket = fake_kubelet(failing.path(), Answer::GrpcError).await;
    let e = kubelet::list(&socket, TIMEOUT).await.unwrap_err();
    assert!(matches!(e, ListError::Grpc(ref c, _) if c == "12"), "{e}");
    // A kubelet that accepts and never answers: the call gives up at its limit.
    let hung = tempfile::tempdir().unwrap();
    let path = hung.path().join("kubelet.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let limit = Duration::from_millis(200);
    assert!(matches!(
        kubelet::list(&path, limit).await,
        Err(ListError::Timeout(_))
    ));
    // Not a socket at all.
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    assert!(kubelet::list(&file, TIMEOUT).await.is_err());
}

/// A fixture procfs with one process per pod UID, in the systemd driver's layout.
fn procfs(dir: &Path, procs: &[(u32, &str)]) {
    for (pid, uid) in procs {
        let d = dir.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let u = uid.replace('-', "_");
        std::fs::write(
            d.join("cgroup"),
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{}.scope\n", "ab".repeat(32)),
        )
        .unwrap();
        std::fs::write(d.join("status"), "Name:\tpython\nUid:\t0\t0\t0\t0\n").unwrap();
    }
}

async fn owners_with(
    socket: PathBuf,
    procs: &[(u32, &str)],
) -> (Owners, tempfile::TempDir, prometheus::Counter) {
    let errors = prometheus::Counter::new("errors", "errors").unwrap();
    let dir = tempfile::tempdir().unwrap();
    procfs(dir.path(), procs);
    let names = Arc::new(PodNames::default());
    tokio::spawn(refresh_loop(
        socket,
        names.clone(),
        Cadence {
            every: Duration::from_secs(30),
            min_gap: Duration::from_millis(20),
            timeout: TIMEOUT,
        },
        errors.clone(),
    ));
    let owners = Owners::new(OwnersConfig {
        procfs: dir.path().to_path_buf(),
        rootfs: dir.path().join("no-rootfs"),
        ..OwnersConfig::default()
    })
    .with_pods(names);
    (owners, dir, errors)
}

const UID_A: &str = "1f6b4d2e-0000-4000-8000-00000000000a";
const UID_C: &str = "1f6b4d2e-0000-4000-8000-00000000000c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_owner_gets_its_name_from_its_gpu_and_a_shared_gpu_names_nobody() {
    let sock_dir = tempfile::tempdir().unwrap();
    let socket = fake_kubelet(sock_dir.path(), Answer::Pods(pods())).await;
    let (mut owners, _dir, errors) = owners_with(socket, &[(100, UID_A), (200, UID_C)]).await;
    // Seen first: asks for a map, named once one answers.
    let first_a = owners.owner_on(100, "GPU-a");
    assert_eq!(first_a.kind, OwnerKind::K8sPod);
    assert_eq!(first_a.id, UID_A);
    owners.owner_on(200, "GPU-c");
    let deadline = Instant::now() + Duration::from_secs(20);
    let a = loop {
        let a = owners.owner_on(100, "GPU-a");
        if !a.namespace.is_empty() || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (a.id.as_str(), a.namespace.as_str(), a.pod.as_str()),
        (UID_A, "ml", "train-0")
    );
    // The same map lists GPU-c under two pods: the pod on it stays known by UID.
    let c = owners.owner_on(200, "GPU-c");
    assert_eq!(
        (c.id.as_str(), c.namespace.as_str(), c.pod.as_str()),
        (UID_C, "", "")
    );
    // owner_of is unchanged: no GPU, no name.
    assert_eq!(owners.owner_of(100).namespace, "");
    assert_eq!(errors.get(), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_socket_pods_are_known_by_uid() {
    let dir = tempfile::tempdir().unwrap();
    let (mut owners, _procfs, errors) =
        owners_with(dir.path().join("absent.sock"), &[(100, UID_A)]).await;
    for _ in 0..10 {
        let a = owners.owner_on(100, "GPU-a");
        assert_eq!(
            (a.id.as_str(), a.namespace.as_str(), a.pod.as_str()),
            (UID_A, "", "")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(errors.get(), 0.0, "a missing socket is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_answering_garbage_is_counted_and_names_nobody() {
    let sock_dir = tempfile::tempdir().unwrap();
    let socket = fake_kubelet(sock_dir.path(), Answer::Garbage).await;
    let (mut owners, _procfs, errors) = owners_with(socket, &[(100, UID_A)]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    // The first call and the one the new pod asks for both fail.
    while errors.get() < 2.0 && Instant::now() < deadline {
        let a = owners.owner_on(100, "GPU-a");
        assert_eq!((a.namespace.as_str(), a.pod.as_str()), ("", ""));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(errors.get() >= 2.0, "errors counted: {}", errors.get());
}

const UID_B: &str = "1f6b4d2e-0000-4000-8000-00000000000b";

#[test]
fn the_agent_exports_a_pod_owner_with_its_namespace_and_name() {
    let gpu = |i: u64| format!("GPU-00000000-0000-0000-0000-{i:012x}");
    let (g0, g1) = (gpu(0), gpu(1));
    // GPU 0 is train-0's alone; GPU 1 is shared by two pods (time-slicing).
    let answer = ListPodResourcesResponse {
        pod_resources: vec![
            pod("ml", "train-0", "nvidia.com/gpu", &[&g0]),
            pod(
                "ml",
                "infer-0",
                "nvidia.com/gpu.shared",
                &[&format!("{g1}::0")],
            ),
            pod(
                "web",
                "infer-1",
                "nvidia.com/gpu.shared",
                &[&format!("{g1}::1")],
            ),
        ],
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sock_dir = tempfile::tempdir().unwrap();
    let socket = rt.block_on(fake_kubelet(sock_dir.path(), Answer::Pods(answer)));
    let tree = tempfile::tempdir().unwrap();
    procfs(tree.path(), &[(7001, UID_A), (7002, UID_B)]);
    let scenario = common::Scenario {
        gpus: vec![
            common::Gpu {
                util: vec![[0, 50]],
                pids: Some(vec![(0, vec![7001])]),
                ..common::Gpu::default()
            },
            common::Gpu {
                util: vec![[0, 50]],
                pids: Some(vec![(0, vec![7002])]),
                ..common::Gpu::default()
            },
        ],
        ..common::Scenario::default()
    };
    let agent = common::Agent::start(
        &scenario,
        common::AgentOpts {
            interval: "200ms",
            extra_args: vec![
                format!("--path.procfs={}", tree.path().display()),
                format!("--path.rootfs={}", tree.path().display()),
                format!("--owners.kubelet-socket={}", socket.display()),
            ],
            ..common::AgentOpts::default()
        },
    );
    agent.wait_ready(Duration::from_secs(20));
    let info = |m: &common::Metrics, gpu: &str, uid: &str, ns: &str, pod: &str| {
        m.get(
            "commitmeter_gpu_owner_info",
            &[
                ("gpu", gpu),
                ("owner_kind", "k8s_pod"),
                ("owner", uid),
                ("namespace", ns),
                ("pod", pod),
            ],
        )
    };
    // Named within a refresh or two (at most every 5 s once the pod is seen).
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = agent.metrics();
        if info(&m, "0", UID_A, "ml", "train-0").is_some() || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        info(&m, "0", UID_A, "ml", "train-0"),
        Some(1.0),
        "pod on GPU 0 named"
    );
    assert_eq!(
        info(&m, "1", UID_B, "", ""),
        Some(1.0),
        "a GPU two pods list names nobody"
    );
    assert_eq!(
        m.get(
            "commitmeter_owner_lookup_errors_total",
            &[("source", "kubelet")]
        ),
        Some(0.0)
    );
    assert!(
        m.series("commitmeter_gpu_owner_info").iter().all(|(l, _)| l
            .get("gpu")
            .map(String::as_str)
            != Some("1")
            || l.get("namespace").map(String::as_str) == Some("")),
        "nothing on GPU 1 is named"
    );
}
