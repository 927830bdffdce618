//! Test support: start the real `rewind` binary (and, where a test needs one, a NATS server
//! of its own on a free port), and small REST helpers.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const ROOT: &str = "test-root-token-0123456789";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn rewind_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rewind")
}

/// A running gateway with its own data dir.
pub struct Gateway {
    pub child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    /// Extra environment for the gateway process.
    pub env: Vec<(String, String)>,
    pub http: reqwest::Client,
    _tmp: Option<tempfile::TempDir>,
}

impl Gateway {
    /// Starts a gateway on a fresh data dir with extra `serve` flags.
    pub async fn start(args: &[&str]) -> Gateway {
        Self::start_with_env(args, &[]).await
    }

    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().to_path_buf();
        let mut gw = Gateway {
            child: None,
            port: free_port(),
            data_dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            _tmp: Some(tmp),
        };
        gw.spawn();
        gw.wait_healthy().await;
        gw
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("gateway.log"))
            .unwrap();
        let child = Command::new(rewind_bin())
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("REWIND_ROOT_TOKEN", ROOT)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("gateway.log")).unwrap_or_default()
    }

    pub async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(self.url("/healthz")).send().await
                && r.status() == 200
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "gateway exited with {status} before it was healthy:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "gateway not healthy in 30s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        child.wait().unwrap()
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the gateway first");
        self.spawn();
        self.wait_healthy().await;
    }

    /// `rewind bus read` against this gateway's bus (the gateway must be stopped for the
    /// local bus). Returns the event ids in bus order.
    pub fn bus_ids(&self, extra: &[&str]) -> Vec<String> {
        bus_read(&self.data_dir, &self.args, extra)
            .into_iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a team, a collection in it and returns (admin token, collection id).
    pub async fn team_with_collection(&self, team: &str, collection: &str) -> (String, String) {
        let (s, t) = self
            .call(
                reqwest::Method::POST,
                "/v1/teams",
                ROOT,
                Some(json!({"name": team})),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        let admin = t["admin_token"].as_str().unwrap().to_string();
        let (s, c) = self
            .call(
                reqwest::Method::POST,
                "/v1/collections",
                &admin,
                Some(json!({"name": collection})),
            )
            .await;
        assert_eq!(s, 201, "{c}");
        (admin, c["id"].as_str().unwrap().to_string())
    }

    pub async fn token(&self, admin: &str, scopes: &[&str]) -> String {
        let (s, t) = self
            .call(
                reqwest::Method::POST,
                "/v1/tokens",
                admin,
                Some(json!({"name": "t", "scopes": scopes})),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        t["token"].as_str().unwrap().to_string()
    }

    /// POSTs a raw body to a collection's events.
    pub async fn send(
        &self,
        token: &str,
        collection: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1/collections/{collection}/events")))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `rewind bus read` with the serve flags of a gateway; returns the NDJSON lines.
pub fn bus_read(data_dir: &Path, serve_args: &[String], extra: &[&str]) -> Vec<Value> {
    let out = Command::new(rewind_bin())
        .args(["bus", "read", "--idle-ms", "1500", "--data-dir"])
        .arg(data_dir)
        .args(serve_args)
        .args(extra)
        .env("REWIND_ROOT_TOKEN", ROOT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bus read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A NATS server of the test's own, with JetStream, that the test can stop and restart.
pub struct Nats {
    pub port: u16,
    child: Option<Child>,
    store: tempfile::TempDir,
    /// Server configuration lines (nats-server's config file syntax), if any.
    config: Option<String>,
}

impl Nats {
    pub fn start() -> Nats {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Nats {
        let mut nats = Nats {
            port,
            child: None,
            store: tempfile::tempdir().unwrap(),
            config: None,
        };
        nats.spawn();
        nats
    }

    /// A server with extra configuration lines, e.g. `max_pending: 40MB`.
    pub fn start_with_config(config: &str) -> Nats {
        let mut nats = Nats {
            port: free_port(),
            child: None,
            store: tempfile::tempdir().unwrap(),
            config: Some(config.to_string()),
        };
        nats.spawn();
        nats
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .arg("-l")
            .arg(self.store.path().join("nats.log"))
            .args(
                self.config
                    .as_ref()
                    .map(|lines| {
                        let file = self.store.path().join("nats.conf");
                        std::fs::write(&file, lines).unwrap();
                        vec!["-c".into(), file.into_os_string()]
                    })
                    .unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed at /usr/sbin/nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Graceful stop (SIGTERM): JetStream flushes its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Builds a JSON event of about `size` bytes.
pub fn event_of_size(i: usize, size: usize) -> String {
    let head = format!("{{\"type\":\"account_created\",\"seq\":{i},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// The `garage` binary: `$REWIND_TEST_GARAGE`, else `garage` on PATH, else where
/// `./scripts/test` installs it (`~/.cache/garage-install/bin/garage`).
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REWIND_TEST_GARAGE") {
        return PathBuf::from(p);
    }
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v garage"])
        .output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/garage-install/bin/garage");
    assert!(
        p.exists(),
        "the S3 tests need Garage: run ./scripts/test (it installs it), or \
         `cargo install garage --locked`, or set REWIND_TEST_GARAGE to its path"
    );
    p
}

/// A single-node Garage (S3-compatible store) of the test's own on loopback ports, with a
/// bucket `rewind` and a key for it; it can be stopped and restarted on the same data.
pub struct Garage {
    pub s3_port: u16,
    config: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

pub const GARAGE_KEY_ID: &str = "GK0123456789abcdef01234567";
pub const GARAGE_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let s3_port = free_port();
        let rpc_port = free_port();
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
            .collect();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let mut g = Garage {
            s3_port,
            config,
            child: None,
            _dir: dir,
        };
        g.spawn();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&[
            "key",
            "import",
            "-n",
            "rewind",
            GARAGE_KEY_ID,
            GARAGE_SECRET,
            "--yes",
        ]);
        g.cli(&["bucket", "create", "rewind"]);
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", "rewind", "--key", "rewind",
        ]);
        g
    }

    /// Runs a `garage` admin command against this node; panics with its output on failure.
    fn cli(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new(garage_bin())
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "garage {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&mut self) {
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start garage");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            assert!(Instant::now() < deadline, "garage did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The environment a gateway needs to use this Garage (with `--archive s3://rewind/…`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{}", self.s3_port),
            ),
            ("AWS_REGION".into(), "garage".into()),
            ("AWS_ACCESS_KEY_ID".into(), GARAGE_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), GARAGE_SECRET.into()),
        ]
    }

    /// An object_store client for the bucket, as the test's own outside view.
    pub fn store(&self) -> std::sync::Arc<dyn object_store::ObjectStore> {
        std::sync::Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(format!("http://127.0.0.1:{}", self.s3_port))
                .with_allow_http(true)
                .with_region("garage")
                .with_access_key_id(GARAGE_KEY_ID)
                .with_secret_access_key(GARAGE_SECRET)
                .with_bucket_name("rewind")
                .build()
                .unwrap(),
        )
    }

    /// Kills the server (the S3 endpoint goes away at once).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `meilisearch` server binary for fault tests: `REWIND_TEST_MEILI_BIN`, else one on
/// `PATH`; `None` when there is none (no registry ships it; see docs/benchmarks.md).
pub fn meili_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("REWIND_TEST_MEILI_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("meilisearch"))
            .find(|p| p.is_file())
    })
}

/// A Meilisearch server of the test's own on a loopback port, with a master key.
pub struct Meili {
    pub port: u16,
    pub key: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Meili {
    pub fn start_on(bin: PathBuf, port: u16) -> Meili {
        let mut m = Meili {
            port,
            key: "rewind-test-master-key-0123456789".into(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            bin,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--http-addr", &format!("127.0.0.1:{}", self.port)])
            .args(["--master-key", &self.key, "--no-analytics"])
            .arg("--db-path")
            .arg(self.dir.path().join("db"))
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start meilisearch");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "meilisearch did not start in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Meili {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
