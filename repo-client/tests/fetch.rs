//! `RepoClient::fetch_blobs_to` against a stand-in repository on 127.0.0.1 (real
//! QUIC, real certificates) that serves whatever bytes the test gives it, lies
//! included: only verified blobs may ever land in the directory.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use image_spec::BlobId;
use repo_client::{ClientError, RepoClient};
use tokio_util::sync::CancellationToken;
use wire::repo::{RepoReply, RepoRequest, RepoResponse};
use wire::{BiStream, Client, ClusterCa, DEFAULT_FRAME_LIMIT, Handler, Identity, Server};

/// Answers `FetchBlobs` with the bytes it holds for each id (whatever they hash
/// to), announcing `announced` bytes for the ids listed there instead of the
/// real length, so a transfer can be cut short.
struct StandIn {
    served: BTreeMap<BlobId, Vec<u8>>,
    announced: BTreeMap<BlobId, u64>,
}

impl Handler for StandIn {
    async fn handle(&self, _peer: Arc<Identity>, mut stream: BiStream) {
        let Ok(RepoRequest::FetchBlobs { blobs }) = stream.read_request(DEFAULT_FRAME_LIMIT).await
        else {
            return;
        };
        let sizes = blobs
            .iter()
            .map(|id| {
                self.announced
                    .get(id)
                    .copied()
                    .unwrap_or(self.served[id].len() as u64)
            })
            .collect();
        let header: RepoReply = Ok(RepoResponse::BlobsFollow { sizes });
        wire::codec::write_frame(&mut stream.send, &header)
            .await
            .unwrap();
        for id in &blobs {
            stream.send.write_all(&self.served[id]).await.unwrap();
        }
        let _ = stream.send.finish();
    }
}

struct Repo {
    addr: SocketAddr,
    ca: ClusterCa,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Repo {
    fn start(handler: StandIn) -> Self {
        let ca = ClusterCa::generate("repo-client-test").unwrap();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            &ca.issue(&Identity::RepoServer).unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(Arc::new(handler), shutdown.clone()));
        Self {
            addr,
            ca,
            shutdown,
            task,
        }
    }

    async fn client(&self) -> RepoClient {
        let creds = self.ca.issue(&"shell/dev-1".parse().unwrap()).unwrap();
        let client = Client::new(&creds, self.addr).unwrap();
        RepoClient::connect(&client, self.addr).await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn sorted_hex(ids: &[BlobId]) -> Vec<String> {
    let mut out: Vec<String> = ids.iter().map(BlobId::to_hex).collect();
    out.sort();
    out
}

#[tokio::test]
async fn fetched_blobs_are_verified_and_land_whole_under_their_ids() {
    let small = b"small blob".to_vec();
    // Several chunks of the transfer, so the bytes arrive in pieces.
    let large: Vec<u8> = (0..3 * wire::codec::CHUNK + 5).map(|i| i as u8).collect();
    let empty = Vec::new();
    let ids = [BlobId::of(&small), BlobId::of(&large), BlobId::of(&empty)];
    let served = BTreeMap::from([
        (ids[0], small.clone()),
        (ids[1], large.clone()),
        (ids[2], empty.clone()),
    ]);
    let repo = Repo::start(StandIn {
        served,
        announced: BTreeMap::new(),
    });
    let dir = tempfile::tempdir().unwrap();
    let got = repo
        .client()
        .await
        .fetch_blobs_to(&ids, dir.path())
        .await
        .unwrap();
    assert_eq!(got, (small.len() + large.len()) as u64);
    // Exactly the blobs, under their ids: no temporary file is left beside them.
    assert_eq!(names(dir.path()), sorted_hex(&ids));
    for (id, bytes) in [(ids[0], &small), (ids[1], &large), (ids[2], &empty)] {
        assert_eq!(&std::fs::read(dir.path().join(id.to_hex())).unwrap(), bytes);
    }
    repo.stop().await;
}

#[tokio::test]
async fn a_blob_whose_bytes_lie_is_refused_and_never_lands() {
    let honest = b"honest".to_vec();
    let claimed = BlobId::of(b"what was asked for");
    let ids = [BlobId::of(&honest), claimed];
    let served = BTreeMap::from([(ids[0], honest.clone()), (claimed, b"a lie".to_vec())]);
    let repo = Repo::start(StandIn {
        served,
        announced: BTreeMap::new(),
    });
    let dir = tempfile::tempdir().unwrap();
    let err = repo
        .client()
        .await
        .fetch_blobs_to(&ids, dir.path())
        .await
        .unwrap_err();
    match err {
        ClientError::BlobMismatch { claimed: c, actual } => {
            assert_eq!(c, claimed);
            assert_eq!(actual, BlobId::of(b"a lie"));
        }
        other => panic!("expected a mismatch, got {other}"),
    }
    // The verified blob before it stays; nothing of the lie does.
    assert_eq!(names(dir.path()), [ids[0].to_hex()]);
    repo.stop().await;
}
