//! The `anchorflow` command line: `run`, `demo`, `check-config`, `status`, `fences`,
//! `bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use anchorflow::settings;
use anchorflow::{bench, demo, doctor, fences_cli, http, pipeline, say, status};
use anchorflow_actors::config::Config;
use anchorflow_actors::runtime::exit::CONFIG as EXIT_CONFIG;
use clap::{Parser, Subcommand};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "anchorflow",
    version,
    about = "austin trace events from Kafka into Redis aggregates and a Parquet warehouse, exactly once"
)]
struct Cli {
    /// Configuration file (TOML). Without it, built-in defaults plus overrides apply.
    #[arg(long, short, env = "ANCHORFLOW_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Override one field, e.g. `--set redis.url=redis://host:6379/0` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    sets: Vec<String>,
    /// Log format: `text` or `json` (overrides `log.format`).
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline until SIGINT/SIGTERM.
    Run,
    /// Run the product end to end on an in-process mock Kafka cluster.
    Demo {
        /// Records to produce.
        #[arg(long, default_value_t = 50_000)]
        events: usize,
        /// Partitions of the demo topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Redis to write to; a throwaway redis-server is started if none answers here.
        #[arg(long, default_value = "redis://127.0.0.1:6379/9")]
        redis_url: String,
        /// Warehouse root.
        #[arg(long, default_value = "./warehouse")]
        warehouse: PathBuf,
        /// Address of the metrics endpoint during the demo (empty disables it).
        #[arg(long, default_value = "127.0.0.1:9898")]
        metrics_listen: String,
    },
    /// Validate the configuration and print it with secrets redacted; with
    /// `--connect`, also reach the broker, Redis and the warehouse (exit 81-87 says
    /// which failed: 1 broker, 2 Redis, 4 warehouse, added to 80).
    CheckConfig {
        /// Reach every dependency as `run` would, one line each.
        #[arg(long)]
        connect: bool,
    },
    /// Per partition: owner epoch, both fences and their last commit, the broker's end
    /// and the lag; then pending publishes, staged series, refused writes, lost markers.
    /// Prints what Redis holds even when the broker does not answer.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect or recover the exactly-once bookkeeping in Redis (docs/exactly-once.md).
    #[command(subcommand)]
    Fences(fences_cli::FencesCommand),
    /// Measure throughput and memory (see docs/benchmarks.md).
    Bench(bench::BenchOptions),
    /// Serve librdkafka's mock cluster with one topic until stdin closes (the
    /// benchmark's out-of-process broker); prints `bootstrap.servers=…`.
    #[command(hide = true)]
    MockServe {
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 16)]
        partitions: i32,
    },
}

fn init_logging(config: &Config, format: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ANCHORFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colour only for a person at a terminal: a file or the journal gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if format.unwrap_or(&config.log.format) == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_config(cli: &Cli, demo_defaults: bool) -> Result<Config, ExitCode> {
    let mut sets = Vec::new();
    if demo_defaults {
        // The demo brings its own broker; the file's brokers (if any) are replaced.
        sets.push("kafka.bootstrap.servers=127.0.0.1:0".to_string());
    }
    sets.extend(cli.sets.iter().cloned());
    let path = cli.config.clone().or_else(|| {
        demo_defaults.then(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"))
    });
    settings::load(
        path.as_deref().filter(|p| !demo_defaults || p.exists()),
        std::env::vars(),
        &sets,
    )
    .map_err(|e| {
        eprintln!("anchorflow: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    // Before any thread starts: freed memory must not pile up in per-thread arenas.
    anchorflow_actors::runtime::memory::cap_allocator_arenas();
    let cli = Cli::parse();
    // A panic no supervisor contains stops the process (exit 70) instead of leaving a
    // dead actor behind; systemd restarts it and the fences make that lose nothing.
    anchorflow_actors::runtime::supervision::install_panic_hook();
    if let Some(format) = &cli.log_format {
        if !matches!(format.as_str(), "text" | "json") {
            eprintln!(
                "anchorflow: invalid configuration: `--log-format`: must be `text` or `json`"
            );
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    }
    let demo_like = matches!(
        cli.command,
        Command::Demo { .. } | Command::Bench(_) | Command::MockServe { .. }
    );
    let config = match load_config(&cli, demo_like) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logging(&config, cli.log_format.as_deref());
    match cli.command {
        Command::CheckConfig { connect } => {
            if !connect {
                say!(
                    "# configuration is valid\n{}",
                    settings::render_redacted(&config)
                );
                return ExitCode::SUCCESS;
            }
            say!("configuration is valid");
            match doctor::run(&config) {
                0 => ExitCode::SUCCESS,
                failed => ExitCode::from(doctor::EXIT_BASE + failed),
            }
        }
        Command::Status { json } => match status::read(&config) {
            Ok(found) => {
                status::print(&found, json);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("anchorflow status: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run => run(config),
        Command::Demo {
            events,
            partitions,
            redis_url,
            warehouse,
            metrics_listen,
        } => {
            let options = demo::DemoOptions {
                events,
                partitions,
                redis_url,
                warehouse,
                metrics_listen,
            };
            reported("demo", demo::run(config, options)).map_or(ExitCode::FAILURE, exit)
        }
        Command::Fences(command) => reported("fences", fences_cli::run(&config, command))
            .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS),
        Command::Bench(options) => reported("bench", bench::run(config, options))
            .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS),
        Command::MockServe { topic, partitions } => {
            reported("mock-serve", bench::mock_serve(&topic, partitions))
                .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
        }
    }
}

/// Prints a subcommand's error.
fn reported<T>(command: &str, result: anyhow::Result<T>) -> Option<T> {
    result
        .map_err(|e| eprintln!("anchorflow {command}: {e:#}"))
        .ok()
}

/// `anchorflow run`: the pipeline until SIGINT/SIGTERM, with the metrics endpoint.
fn run(config: Config) -> ExitCode {
    let telemetry = pipeline::Telemetry::default();
    if !config.metrics.listen.is_empty() {
        match http::serve(&config.metrics.listen, telemetry.clone()) {
            Ok((addr, _)) => info!(%addr, "metrics endpoint listening"),
            Err(e) => {
                error!(error = format!("{e:#}"), "cannot serve metrics");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let health = telemetry.health.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        // Before the actors run nothing is in flight (no partition is claimed): a
        // stop during start-up (S3 or Redis retries) ends the process at once.
        if !health.running() {
            info!("stop requested during start-up; nothing is in flight");
            std::process::exit(0);
        }
        let _ = stop_tx.send(true);
    }) {
        error!(error = %e, "cannot install the signal handler");
        return ExitCode::FAILURE;
    }
    match pipeline::run(config, telemetry, stop_rx) {
        Ok(code) => exit(code),
        Err(e) => {
            error!(error = format!("{e:#}"), "pipeline failed");
            ExitCode::FAILURE
        }
    }
}
