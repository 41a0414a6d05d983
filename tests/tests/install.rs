//! Installing services on an instance (upgrade steps 1–4) against a real repository:
//! only missing blobs are fetched, the release links the cache's files and copies
//! the previous build's outputs, old releases stay untouched, a broken build
//! leaves nothing behind, and a build cannot change the commit's files.

#![allow(clippy::unwrap_used)]

use image_spec::{InstanceName, ServiceName};
use molt_e2e::{TestCluster, copy_example, push_main, write_file};
use shell::build::BuildError;
use shell::install::{BlobCache, InstallContext, InstallError, install};
use shell::release::{Releases, verify};

/// An instance's stores under `root`, and its connection to the repository.
struct Node {
    repo: repo_client::RepoClient,
    cache: BlobCache,
    releases: Releases,
    instance: InstanceName,
    logs: std::path::PathBuf,
}

impl Node {
    async fn open(cluster: &TestCluster, root: &std::path::Path) -> Self {
        Self {
            repo: cluster.repo_client("shell/dev-1").await,
            cache: BlobCache::open(&root.join("cache")).unwrap(),
            releases: Releases::open(&root.join("releases")).unwrap().0,
            instance: InstanceName::new("dev-1").unwrap(),
            logs: root.join("logs"),
        }
    }

    fn ctx(&self) -> InstallContext<'_> {
        InstallContext {
            repo: &self.repo,
            cache: &self.cache,
            releases: &self.releases,
            instance: &self.instance,
            logs: &self.logs,
        }
    }
}

#[tokio::test]
async fn install_builds_incrementally_and_refuses_broken_builds() {
    let cluster = TestCluster::start().await;
    let src = cluster.path("orders");
    copy_example("orders", &src);
    let repo = cluster.repo_client("user/ada/developer").await;
    let v1 = repo.push(&src, &push_main("v1"), |_| {}).await.unwrap();

    let instance_root = cluster.path("instance");
    let node = Node::open(&cluster, &instance_root).await;
    let releases = &node.releases;
    let ctx = node.ctx();
    let service = ServiceName::new("orders").unwrap();

    // First install: the full tree, built from scratch.
    let first = install(&ctx, &service, v1.commit, None).await.unwrap();
    assert_eq!(first.fetched_blobs, 5);
    assert!(first.built);
    let binary = first.release.dir.join("target/release/orders");
    assert!(binary.is_file());
    verify(&first.release.dir, &first.release.tree).unwrap();
    let v1_binary = std::fs::read(&binary).unwrap();

    // Installing the installed commit does nothing.
    let same = install(&ctx, &service, v1.commit, Some(&first.release))
        .await
        .unwrap();
    assert_eq!((same.fetched_blobs, same.built), (0, false));

    // One file changes: one blob is fetched, the build outputs come along.
    let main_rs = std::fs::read_to_string(src.join("src/main.rs")).unwrap();
    write_file(
        &src,
        "src/main.rs",
        main_rs
            .replace(
                "const VERSION: &str = \"1\";",
                "const VERSION: &str = \"2\";",
            )
            .as_bytes(),
    );
    let v2 = repo.push(&src, &push_main("v2"), |_| {}).await.unwrap();
    let second = install(&ctx, &service, v2.commit, Some(&first.release))
        .await
        .unwrap();
    assert_eq!(second.fetched_blobs, 1);
    // Every source file is linked from the cache, none copied: what is
    // copied is the build's outputs.
    assert_eq!(
        second.copied.linked,
        second.release.tree.len() as u64,
        "{:?}",
        second.copied
    );
    assert!(
        second.copied.files > 5,
        "build outputs were not copied: {:?}",
        second.copied
    );
    let v2_binary = std::fs::read(second.release.dir.join("target/release/orders")).unwrap();
    assert_ne!(v1_binary, v2_binary);
    // The old release is exactly as it was.
    verify(&first.release.dir, &first.release.tree).unwrap();
    assert_eq!(std::fs::read(&binary).unwrap(), v1_binary);

    // A broken build: a clear error with the compiler's last lines; no release made.
    write_file(&src, "src/main.rs", b"fn main() { this is not rust }");
    let v3 = repo.push(&src, &push_main("broken"), |_| {}).await.unwrap();
    let err = install(&ctx, &service, v3.commit, Some(&second.release))
        .await
        .unwrap_err();
    let InstallError::Build(BuildError::Failed { tail, .. }) = &err else {
        panic!("expected a build failure, got {err}")
    };
    assert!(tail.contains("error"), "{tail}");
    assert!(!releases.dir(&service, &v3.commit).exists());
    let leftovers: Vec<_> = std::fs::read_dir(instance_root.join("releases/orders"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    verify(&second.release.dir, &second.release.tree).unwrap();

    // Going back to v1 reuses its sealed release: nothing fetched, nothing built.
    let back = install(&ctx, &service, v1.commit, Some(&second.release))
        .await
        .unwrap();
    assert_eq!(back.release.dir, first.release.dir);
    assert_eq!((back.fetched_blobs, back.built), (0, false));
}

/// Builds that try to change the commit's files, which the release shares
/// with the blob cache and the previous release: an in-place write and a
/// `chmod` are refused by the kernel (the build fails, naming the file), a
/// file replaced is named by the check after the build; in every case the
/// previous release and the cache keep their bytes. A build that only adds
/// files succeeds.
#[tokio::test]
async fn a_build_cannot_change_the_commits_files() {
    let cluster = TestCluster::start().await;
    let repo = cluster.repo_client("user/ada/developer").await;
    let src = cluster.path("svc");
    let service = ServiceName::new("svc").unwrap();
    let manifest = |build: &str| {
        format!(
            "name = \"svc\"\n[run]\ncommand = [\"./run\"]\n[[ports]]\nport = 8080\n[build]\ncommand = [\"sh\", \"-c\", {build:?}]\n"
        )
    };
    write_file(
        &src,
        "service.toml",
        manifest("mkdir -p out && cp app.py out/").as_bytes(),
    );
    write_file(&src, "app.py", b"print('v1')\n");
    let v1 = repo.push(&src, &push_main("v1"), |_| {}).await.unwrap();

    let node = Node::open(&cluster, &cluster.path("instance")).await;
    let (cache, releases) = (&node.cache, &node.releases);
    let ctx = node.ctx();
    let first = install(&ctx, &service, v1.commit, None).await.unwrap();
    assert_eq!(first.copied.linked, 2);
    let app_blob = first
        .release
        .tree
        .get(&"app.py".parse().unwrap())
        .unwrap()
        .blob();
    let cached_app = cache.path(&app_blob);

    for (how, build, expect) in [
        ("append", "echo evil >> app.py", "Permission denied"),
        ("truncate", ": > app.py", "Permission denied"),
        (
            "chmod",
            "chmod u+w app.py && echo evil >> app.py",
            "Operation not permitted",
        ),
        ("replace", "rm app.py && echo evil > app.py", "replaced it"),
    ] {
        write_file(&src, "service.toml", manifest(build).as_bytes());
        let next = repo.push(&src, &push_main(how), |_| {}).await.unwrap();
        let err = install(&ctx, &service, next.commit, Some(&first.release))
            .await
            .unwrap_err();
        let text = match &err {
            InstallError::Build(BuildError::Failed { tail, .. }) => tail.clone(),
            other => other.to_string(),
        };
        assert!(text.contains(expect), "{how}: {text}");
        if how == "replace" {
            assert!(text.contains("app.py"), "{text}");
        }
        // Nothing of it stays; v1 and the cache keep their bytes.
        assert!(!releases.dir(&service, &next.commit).exists(), "{how}");
        verify(&first.release.dir, &first.release.tree).unwrap();
        assert_eq!(
            std::fs::read(&cached_app).unwrap(),
            b"print('v1')\n",
            "{how}"
        );
    }

    // Adding files (outputs, caches) is what builds do: fine.
    write_file(
        &src,
        "service.toml",
        manifest("mkdir -p out && date > out/stamp").as_bytes(),
    );
    let ok = repo.push(&src, &push_main("adds"), |_| {}).await.unwrap();
    let built = install(&ctx, &service, ok.commit, Some(&first.release))
        .await
        .unwrap();
    assert!(built.release.dir.join("out/stamp").is_file());
    verify(&built.release.dir, &built.release.tree).unwrap();
}

/// Bad bytes in the blob cache never reach a new release: a byte flipped in
/// a cached file and bytes appended to a file of the running release (the
/// same inode, shared) are found at the next install — by the file's changed
/// time, then its hash — set aside and fetched anew, though the change being
/// installed touches neither file.
#[tokio::test]
async fn bad_bytes_in_the_cache_are_fetched_anew_not_linked() {
    let cluster = TestCluster::start().await;
    let repo = cluster.repo_client("user/ada/developer").await;
    let src = cluster.path("svc");
    molt_e2e::write_service(
        &src,
        "svc",
        &[
            ("a.txt", b"alpha alpha\n"),
            ("b.txt", b"bravo\n"),
            ("c.txt", b"charlie v1\n"),
        ],
    );
    let v1 = repo.push(&src, &push_main("v1"), |_| {}).await.unwrap();
    let node = Node::open(&cluster, &cluster.path("instance")).await;
    let ctx = node.ctx();
    let service = ServiceName::new("svc").unwrap();
    let first = install(&ctx, &service, v1.commit, None).await.unwrap();

    let a = node.cache.path(&image_spec::BlobId::of(b"alpha alpha\n"));
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[0] ^= 1;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(first.release.dir.join("b.txt"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"tampered\n"))
        .unwrap();

    write_file(&src, "c.txt", b"charlie v2\n");
    let v2 = repo.push(&src, &push_main("v2"), |_| {}).await.unwrap();
    let second = install(&ctx, &service, v2.commit, Some(&first.release))
        .await
        .unwrap();
    assert_eq!(second.fetched_blobs, 3, "c, and a and b anew");
    verify(&second.release.dir, &second.release.tree).unwrap();
    assert_eq!(
        std::fs::read(second.release.dir.join("a.txt")).unwrap(),
        b"alpha alpha\n"
    );
    assert_eq!(
        std::fs::read(second.release.dir.join("b.txt")).unwrap(),
        b"bravo\n"
    );
    let aside = std::fs::read_dir(cluster.path("instance/cache/.quarantine"))
        .unwrap()
        .count();
    assert_eq!(aside, 2);
}
