//! Operating anchorflow as an SRE does (issue 30), against the binary: configuration
//! that `run` would refuse is refused by `check-config` first, naming the field;
//! `check-config --connect` reaches every dependency and its exit code says which
//! failed; `status` shows the partitions even with the broker down; a second live run
//! of one instance id refuses to start and a clean stop releases it; logs into a file
//! carry no colour codes; a closed stdout ends a command quietly; Redis over TLS with a
//! private CA and a client certificate.

mod common;

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::*;
use common::servers::free_port;
use common::*;

/// A port nothing listens on.
fn closed_port() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn check_config_refuses_what_run_would_refuse_naming_the_field() {
    let setup = Setup::new("check-config", 1, redis_url(29));
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["kafka.no.such.property=1"],
            "kafka.no.such.property",
            "No such configuration property",
        ),
        (
            &["kafka.security.protocol=bogus"],
            "kafka.security.protocol",
            "bogus",
        ),
        (
            &[
                "warehouse.root=s3://lake/x",
                "warehouse.s3.endpoint=http://127.0.0.1:9000",
            ],
            "warehouse.s3.endpoint",
            "allow_http",
        ),
        (
            &[
                "warehouse.root=s3://lake/x",
                "warehouse.s3.endpoint=notaurl",
                "warehouse.s3.allow_http=true",
            ],
            "warehouse.s3.endpoint",
            "notaurl",
        ),
    ];
    for (sets, field, words) in cases {
        for command in ["check-config", "run"] {
            let (status, _, stderr) = setup.command(&[command], sets);
            assert_eq!(status.code(), Some(78), "{command} {sets:?}: {stderr}");
            assert!(
                stderr.contains(field) && stderr.contains(words) && !stderr.contains("panicked"),
                "{command} {sets:?} names {field} and says {words:?}: {stderr}"
            );
        }
    }
}

/// `check-config | head -1`: the reader goes away after one line; the command ends
/// quietly, without a panic or a backtrace.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let setup = Setup::new("closed-stdout", 1, redis_url(29));
    let mut child = Command::new(binary())
        .arg("check-config")
        .args(setup.sets("x", ""))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_config_connect_says_which_dependency_failed() {
    let setup = Setup::new("connect", 1, redis_url(29));
    let (status, stdout, stderr) = setup.command(&["check-config", "--connect"], &[]);
    assert_eq!(status.code(), Some(0), "{stdout}{stderr}");
    for line in ["kafka: ok", "redis: ok", "warehouse: ok"] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    assert!(stdout.contains("1 partitions"), "{stdout}");
    assert!(stdout.contains("maxmemory-policy"), "{stdout}");
    let broker = format!("kafka.bootstrap.servers={}", closed_port());
    let (status, stdout, _) = setup.command(&["check-config", "--connect"], &[&broker]);
    assert_eq!(status.code(), Some(81), "{stdout}");
    assert!(
        stdout.contains("kafka: FAILED") && stdout.contains("redis: ok"),
        "{stdout}"
    );
    let redis = format!("redis.url=redis://{}/0", closed_port());
    let (status, stdout, _) = setup.command(
        &["check-config", "--connect"],
        &[&broker, &redis, "redis.command_timeout_secs=2"],
    );
    assert_eq!(status.code(), Some(83), "broker and Redis: {stdout}");
    let (status, stdout, _) = setup.command(
        &["check-config", "--connect"],
        &["warehouse.root=/proc/nope"],
    );
    assert_eq!(status.code(), Some(84), "the warehouse: {stdout}");
    assert!(stdout.contains("warehouse: FAILED"), "{stdout}");
    // A bucket: the probe is written, published (its upload completed) and removed.
    let bucket = common::bucket::s3_sets(&format!("doctor-{}", std::process::id()));
    let bucket: Vec<&str> = bucket.iter().map(String::as_str).collect();
    let (status, stdout, stderr) = setup.command(&["check-config", "--connect"], &bucket);
    assert_eq!(status.code(), Some(0), "a bucket: {stdout}{stderr}");
    assert!(stdout.contains("warehouse: ok"), "{stdout}");
}

/// After a run, `status` shows every partition's fences and lag; with the broker
/// down it still shows what Redis holds, in seconds, not after the broker's timeouts.
/// A second live run with the same instance id refuses to start (exit 73), a clean stop
/// releases the id, and the log in a file carries no colour codes.
#[test]
fn status_works_without_the_broker_and_an_instance_id_runs_once() {
    let setup = Setup::new("status", 2, redis_url(30));
    let produced = setup.produce(3_000, 600);
    let first = setup.spawn("only-once", &[], "");
    setup.wait_drained(&produced);
    let mut second = setup.spawn("only-once", &[], "");
    let code = second.wait_exit(Duration::from_secs(60)).code();
    let log = second.tail();
    assert_eq!(code, Some(73), "the second run is refused: {log}");
    assert!(
        log.contains("another live run holds this instance id"),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes in a log file: {log}"
    );

    let (status, stdout, stderr) = setup.command(&["status", "--json"], &[]);
    assert!(status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("status --json");
    let partitions = json["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{stdout}");
    for p in partitions {
        let end = p["end_offset"].as_i64().unwrap();
        assert_eq!(p["redis_fence"].as_i64(), Some(end), "{stdout}");
        assert_eq!(p["lag"].as_i64(), Some(0), "{stdout}");
        assert!(p["redis_committed_secs_ago"].as_f64().is_some(), "{stdout}");
    }
    assert!(json["broker_error"].is_null());

    let broker = format!("kafka.bootstrap.servers={}", closed_port());
    let started = Instant::now();
    let (status, stdout, stderr) = setup.command(&["status"], &[&broker]);
    assert!(status.success(), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded");
    assert!(stdout.contains("broker: unreachable"), "{stdout}");
    for p in 0..2 {
        let end = produced[&p].len();
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{p}\t1\t{end}\t{end}\t-"))),
            "partition {p} from Redis alone: {stdout}"
        );
    }
    let (status, stdout, _) = setup.command(&["fences", "show"], &[&broker]);
    assert!(status.success(), "fences show too: {stdout}");

    // A graceful stop hands the instance id back: another host need not wait out the
    // lease to start it.
    let keys = anchorflow_actors::protocol::keys::FenceKeys::new(&setup.group, &setup.topic);
    let lease = format!("{}only-once", keys.instances_prefix);
    let mut conn = redis::Client::open(setup.url.as_str())
        .and_then(|c| c.get_connection())
        .expect("redis");
    let held = |conn: &mut redis::Connection| -> Option<String> {
        redis::cmd("GET").arg(&lease).query(conn).expect("GET")
    };
    assert!(
        held(&mut conn).is_some(),
        "the running instance holds its lease"
    );
    first.stop();
    assert_eq!(held(&mut conn), None, "released at a clean stop");
    setup.check(&produced);
}

/// With the broker down, a failure is one line and its repeats a count: not a line
/// per poll (hundreds in seconds, each reported twice, before).
#[test]
fn a_broker_that_is_down_is_a_few_lines_not_a_flood() {
    let mut setup = Setup::new("quiet-logs", 1, redis_url(29));
    let broker = format!("kafka.bootstrap.servers={}", closed_port());
    setup.set(broker.as_str());
    let mut run = setup.spawn("quiet-logs", &[], "");
    std::thread::sleep(Duration::from_secs(10));
    run.signal("TERM");
    run.wait_exit(Duration::from_secs(60));
    let log = std::fs::read_to_string(&run.log).unwrap();
    let loud = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .count();
    assert!(
        (1..=12).contains(&loud),
        "{loud} error and warning lines in 10 s of a broker down:\n{log}"
    );
    assert!(log.contains("repeated="), "repeats are counted: {log}");
}

/// The shipped alerting rules on a real Prometheus (Debian's, started here on a free
/// port) scraping a running anchorflow: Redis stops, and `AnchorflowNotReady` fires.
/// The rules' `for:` durations are cut to nothing in the copy Prometheus loads (their
/// timing is `promtool test rules`'s business, config/alerts.test.yml); the expressions
/// and the series they read are the shipped ones.
#[test]
fn a_shipped_alert_fires_on_a_real_fault_in_a_real_prometheus() {
    let prometheus = service("ANCHORFLOW_TEST_PROMETHEUS");
    let mut redis = common::servers::TestRedis::start();
    let setup = Setup::new("alerts", 1, redis.url(1));
    let produced = setup.produce(3_100, 300);
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("alerts", &[], &metrics);
    setup.wait_drained(&produced);

    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alerts.yml"),
    )
    .unwrap();
    let rules: String = rules
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 0s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [alerts.yml]\nscrape_configs:\n  - job_name: anchorflow\n    static_configs: [{{targets: [\"{metrics}\"]}}]\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting prometheus");
    let firing = |name: &str| {
        http_get(&web, "/api/v1/alerts").is_some_and(|(_, body)| {
            body.split("\"alertname\":").skip(1).any(|a| {
                a.starts_with(&format!("\"{name}\"")) && a.contains("\"state\":\"firing\"")
            })
        })
    };
    let ready = |_: &()| {
        http_get(&web, "/api/v1/query?query=anchorflow_ready")
            .is_some_and(|(_, body)| body.contains("\"value\":[") && body.contains(",\"1\"]"))
    };
    setup.wait_until(
        "Prometheus scrapes a ready anchorflow",
        Duration::from_secs(60),
        || ready(&()),
    );
    assert!(!firing("AnchorflowNotReady"), "not firing while ready");
    redis.stop();
    setup.wait_until("AnchorflowNotReady fires", Duration::from_secs(90), || {
        firing("AnchorflowNotReady")
    });
    redis.restart();
    let _ = server.kill();
    let _ = server.wait();
    run.stop();
    setup.check(&produced);
}

/// SIGTERM while start-up waits for a bucket that does not answer (a listener that
/// never accepts: each request waits out object_store's timeout before its retries):
/// the process ends at once, exit 0; nothing was in flight. Before, it was ignored
/// until the retries ran out.
#[test]
fn sigterm_during_start_up_is_honoured_at_once() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut setup = Setup::new("term-at-start", 1, redis_url(29));
    setup
        .set("warehouse.root=s3://lake/anchorflow")
        .set(format!(
            "warehouse.s3.endpoint=http://{}",
            silent.local_addr().unwrap()
        ))
        .set("warehouse.s3.allow_http=true")
        .set("warehouse.s3.region=us-east-1")
        .set("warehouse.s3.access_key_id=k")
        .set("warehouse.s3.secret_access_key=s");
    let mut run = setup.spawn("term-at-start", &[], "");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "still starting: {}",
        run.tail()
    );
    let asked = Instant::now();
    run.signal("TERM");
    let status = run.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", run.tail());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "ended {:?} after SIGTERM",
        asked.elapsed()
    );
}

/// A private CA, and a server and a client certificate it signed, made with the
/// `openssl` command (installed by scripts/test-env.sh): `ca.crt`, `server.{crt,key}`
/// for 127.0.0.1, `client.{crt,key}`.
fn make_certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (installed by scripts/test-env.sh)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=anchorflow test CA",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=localhost"), ("client", "/CN=anchorflow")] {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ]);
    }
}

/// Redis over TLS with a private CA and client certificates (`redis.tls.*`): without
/// the CA file the server's certificate does not verify, without the client's a Redis
/// with `tls-auth-clients yes` refuses; with both `check-config --connect` passes and a
/// run drains exactly (the oracle reads the same server on its plain port).
#[test]
fn redis_over_tls_with_a_ca_file_and_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let file = |name: &str| certs.path().join(name).display().to_string();
    let tls_port = free_port().to_string();
    let redis = common::servers::TestRedis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &file("server.crt"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.crt"),
        "--tls-auth-clients",
        "yes",
    ]);
    let mut setup = Setup::new("redis-tls", 1, redis.url(0));
    let url = format!("redis.url=rediss://127.0.0.1:{tls_port}/0");
    let ca = format!("redis.tls.ca_file={}", file("ca.crt"));
    let crt = format!("redis.tls.crt_file={}", file("client.crt"));
    let key = format!("redis.tls.key_file={}", file("client.key"));
    let connect = |sets: &[&str]| {
        let (status, stdout, stderr) = setup.command(&["check-config", "--connect"], sets);
        (status.code(), stdout + &stderr)
    };
    let (code, out) = connect(&[&url, &crt, &key, "redis.command_timeout_secs=5"]);
    assert_eq!(
        code,
        Some(82),
        "the server's certificate needs the CA: {out}"
    );
    let (code, out) = connect(&[&url, &ca, "redis.command_timeout_secs=5"]);
    assert_eq!(
        code,
        Some(82),
        "the server asks for a client certificate: {out}"
    );
    let (code, out) = connect(&[&url, &ca, &crt]);
    assert_eq!(code, Some(78), "a certificate without its key: {out}");
    assert!(out.contains("redis.tls.crt_file"), "{out}");
    let (code, out) = connect(&[&url, &ca, &crt, &key]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("redis: ok"), "{out}");

    for set in [url, ca, crt, key] {
        setup.set(set);
    }
    let produced = setup.produce(2_000, 500);
    let run = setup.spawn("redis-tls", &[], "");
    setup.wait_drained(&produced);
    run.stop();
    setup.check(&produced);
}
