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
    /// How many ids each request named.
    requests: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Handler for StandIn {
    async fn handle(&self, _peer: Arc<Identity>, mut stream: BiStream) {
        let Ok(RepoRequest::FetchBlobs { blobs }) = stream.read_request(DEFAULT_FRAME_LIMIT).await
        else {
            return;
        };
        self.requests.lock().unwrap().push(blobs.len());
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

/// Fetches `ids` from a stand-in serving `served` (announcing `announced`
/// sizes where given) into a new directory.
async fn fetch(
    served: &[(BlobId, Vec<u8>)],
    announced: &[(BlobId, u64)],
    ids: &[BlobId],
) -> (tempfile::TempDir, Result<u64, ClientError>) {
    let repo = Repo::start(StandIn {
        served: served.iter().cloned().collect(),
        announced: announced.iter().copied().collect(),
        requests: Arc::default(),
    });
    let dir = tempfile::tempdir().unwrap();
    let got = repo.client().await.fetch_blobs_to(ids, dir.path()).await;
    repo.stop().await;
    (dir, got)
}

/// `dir` holds exactly `blobs`, each under its id with its bytes: no temporary
/// file beside them.
fn assert_holds_exactly(dir: &Path, blobs: &[(BlobId, Vec<u8>)]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = blobs.iter().map(|(id, _)| id.to_hex()).collect();
    expected.sort();
    assert_eq!(names, expected);
    for (id, bytes) in blobs {
        assert_eq!(&std::fs::read(dir.join(id.to_hex())).unwrap(), bytes);
    }
}

/// Each of `bytes` under its id.
fn blobs(bytes: impl IntoIterator<Item = Vec<u8>>) -> Vec<(BlobId, Vec<u8>)> {
    bytes.into_iter().map(|b| (BlobId::of(&b), b)).collect()
}

fn ids(blobs: &[(BlobId, Vec<u8>)]) -> Vec<BlobId> {
    blobs.iter().map(|(id, _)| *id).collect()
}

#[tokio::test]
async fn fetched_blobs_are_verified_and_land_whole_under_their_ids() {
    // The large one spans several chunks of the transfer.
    let served = blobs([
        b"small blob".to_vec(),
        (0..3 * wire::codec::CHUNK + 5).map(|i| i as u8).collect(),
        Vec::new(),
    ]);
    let (dir, got) = fetch(&served, &[], &ids(&served)).await;
    let total: usize = served.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(got.unwrap(), total as u64);
    assert_holds_exactly(dir.path(), &served);
}

#[tokio::test]
async fn many_blobs_all_land_while_earlier_ones_are_synced() {
    // Three groups and some: several are made durable while the next arrive.
    let served =
        blobs((0..(3 * repo_client::GROUP_FILES + 7)).map(|i| format!("blob {i}").into_bytes()));
    let (dir, got) = fetch(&served, &[], &ids(&served)).await;
    let total: usize = served.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(got.unwrap(), total as u64);
    assert_holds_exactly(dir.path(), &served);
}

#[tokio::test]
async fn a_blob_whose_bytes_lie_is_refused_and_never_lands() {
    let honest = blobs([b"honest".to_vec()]);
    let claimed = BlobId::of(b"what was asked for");
    let mut served = honest.clone();
    served.push((claimed, b"a lie".to_vec()));
    let (dir, got) = fetch(&served, &[], &[honest[0].0, claimed]).await;
    match got.unwrap_err() {
        ClientError::BlobMismatch { claimed: c, actual } => {
            assert_eq!(c, claimed);
            assert_eq!(actual, BlobId::of(b"a lie"));
        }
        other => panic!("expected a mismatch, got {other}"),
    }
    // The verified blob before it stays; nothing of the lie does.
    assert_holds_exactly(dir.path(), &honest);
}

#[tokio::test]
async fn a_transfer_cut_short_keeps_the_blobs_before_it_and_nothing_of_the_rest() {
    let served = blobs([b"first".to_vec(), b"second".to_vec(), b"third".to_vec()]);
    // The second blob is announced longer than it is: the stream ends inside it.
    let (dir, got) = fetch(&served, &[(served[1].0, 1000)], &ids(&served)).await;
    let err = got.unwrap_err();
    assert!(
        matches!(err, ClientError::Frame(wire::FrameError::Truncated { .. })),
        "{err}"
    );
    // The first is in place and whole; no partial file of the second remains.
    assert_holds_exactly(dir.path(), &served[..1]);
}

#[tokio::test]
async fn a_fetch_of_more_blobs_than_a_request_takes_is_split_in_batches() {
    const BATCH: usize = 100;
    let n = 2 * BATCH + 1;
    let served = blobs((0..n).map(|i| (i as u32).to_le_bytes().to_vec()));
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let repo = Repo::start(StandIn {
        served: served.iter().cloned().collect(),
        announced: BTreeMap::new(),
        requests: requests.clone(),
    });
    let dir = tempfile::tempdir().unwrap();
    let got = repo
        .client()
        .await
        .with_blobs_per_request(BATCH)
        .fetch_blobs_to(&ids(&served), dir.path())
        .await;
    repo.stop().await;
    assert_eq!(got.unwrap(), 4 * n as u64);
    assert_eq!(*requests.lock().unwrap(), [BATCH, BATCH, 1]);
    assert_holds_exactly(dir.path(), &served);
    // The default stays well inside what the server takes in one request.
    const { assert!(repo_client::BLOBS_PER_REQUEST < wire::repo::MAX_BLOBS_PER_REQUEST) };
}
