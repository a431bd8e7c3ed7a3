//! Private servers for the fault tests: a `redis-server` and a tansu broker that one
//! test may pause (SIGSTOP), stop, restart or roll back without disturbing the shared
//! services of `scripts/test-env.sh` that every other test uses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound once and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

fn wait_port(port: u16, up: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() != up {
        assert!(
            Instant::now() < deadline,
            "{what} on port {port} never went {}",
            if up { "up" } else { "down" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `redis-server` of one test, with AOF persistence so that a stop and restart keeps
/// its data (a restart of a production Redis with persistence).
pub struct TestRedis {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    /// More `redis-server` arguments (e.g. a slow-log threshold).
    extra: Vec<String>,
}

impl TestRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let mut redis = TestRedis {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        redis.launch();
        redis
    }

    /// Starts redis-server on this port and folder with `persistence` arguments.
    fn spawn(&mut self, persistence: &[&str]) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--databases", "16"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/test-env.sh)");
        self.child = Some(child);
        wait_port(self.port, true, "redis-server");
    }

    fn launch(&mut self) {
        self.spawn(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]);
        // The port answers before the data set is loaded; PING answers once it is.
        let deadline = Instant::now() + Duration::from_secs(30);
        while redis::Client::open(self.url(0).as_str())
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server running").id()
    }

    /// Freezes the server: connections stay open, nothing answers.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// A connection of the test's own to this server (calls time out).
    pub fn admin(&self) -> redis::Connection {
        super::connect(&self.url(0))
    }

    /// Drops every client connection but the caller's (`CLIENT KILL TYPE normal`), as
    /// a failover, a proxy's idle timeout or an operator does; returns how many.
    pub fn kill_clients(&self, admin: &mut redis::Connection) -> i64 {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query(admin)
            .unwrap_or(0)
    }

    /// Sets `maxmemory` (bytes; 0 lifts the limit). With the default `noeviction`
    /// policy, a limit below what the data set uses refuses every write with `OOM`.
    pub fn set_maxmemory(&self, admin: &mut redis::Connection, bytes: u64) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes)
            .query::<()>(admin)
            .expect("CONFIG SET maxmemory");
    }

    /// Stops the server (its data is on disk): connections are refused until
    /// [`TestRedis::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            child.wait().unwrap();
        }
        wait_port(self.port, false, "redis-server");
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// A snapshot of the data set now (an RDB file), for [`TestRedis::restore`].
    pub fn snapshot(&self) -> PathBuf {
        let mut conn = redis::Client::open(self.url(0).as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("SAVE").query::<()>(&mut conn).unwrap();
        let saved = self.dir.path().join("snapshot.rdb");
        std::fs::copy(self.dir.path().join("dump.rdb"), &saved).unwrap();
        saved
    }

    /// Restarts the server from an older snapshot, as an operator restoring a backup
    /// (or a replica promoted with stale data) would.
    pub fn restore(&mut self, snapshot: &Path) {
        self.stop();
        let appendonly = self.dir.path().join("appendonlydir");
        let _ = std::fs::remove_dir_all(&appendonly);
        std::fs::copy(snapshot, self.dir.path().join("dump.rdb")).unwrap();
        // Without an AOF, Redis loads the RDB; AOF is switched on again once loaded.
        self.spawn(&["--appendonly", "no", "--save", ""]);
        let mut conn = redis::Client::open(self.url(0).as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendonly")
            .arg("yes")
            .query::<()>(&mut conn)
            .unwrap();
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A tansu broker of one test (in-memory storage: pausing keeps its data, stopping
/// would lose it).
pub struct TestBroker {
    child: Child,
    pub port: u16,
}

impl TestBroker {
    pub fn start() -> Self {
        let tansu = std::env::var("ANCHORFLOW_TEST_TANSU")
            .expect("ANCHORFLOW_TEST_TANSU is not set: run the suite with scripts/test.sh");
        let port = free_port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tansu");
        wait_port(port, true, "tansu");
        TestBroker { child, port }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpfs mounted over a folder, so that a test can give the warehouse a disk that is
/// full or out of inodes, and then grow it. Mounting needs root (the tests run as root
/// in CI); unmounted when dropped.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str, inodes: u64) -> Self {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},nr_inodes={inodes}"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mounting a tmpfs on {} failed: the disk fault tests need root",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Gives the disk a new size and inode count (growing it "clears the condition").
    pub fn remount(&self, size: &str, inodes: u64) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size},nr_inodes={inodes}")])
            .arg(&self.path)
            .status()
            .expect("mount -o remount");
        assert!(status.success(), "remounting {}", self.path.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Hands a folder to the `nobody` user (for a child run as `nobody`).
pub fn give_to_nobody(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {}", path.display());
}

/// Sets a path's permission bits (as `chmod` would).
pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What a child runs under to be the `nobody` user, for which file permissions count.
pub const AS_NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];
