//! The `payguard` command line: parses arguments, sets up logging, runs a command from
//! [`payguard::app`], and turns the outcome into an exit code (0 ok, 1 failure, 2 bad config).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use payguard::app::{self, GenerateOptions, GenerateOutput};
use payguard::pipeline::RunOptions;
use payguard::source::simulator::SimulatorParams;

/// jemalloc rather than glibc malloc: the window state and DataFusion allocate and free many
/// small blocks per batch, which glibc spends a large share of the engine's time consolidating.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Real-time payment fraud detection: Kafka -> SQL features and rules -> model scoring ->
/// PostgreSQL/TimescaleDB, exactly-once.
#[derive(Debug, Parser)]
#[command(name = "payguard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the pipeline: consume the sources' Kafka topics and commit results and offsets.
    Run {
        /// Config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Stop once every partition reaches the end offset it had at start (batch jobs, tests).
        #[arg(long)]
        stop_at_end: bool,
    },
    /// Run the whole pipeline with no external service: the built-in simulator as input, an
    /// in-memory store, and the HTTP API.
    Demo {
        /// Config file (default: ./config.toml if present, else the built-in one); its input and
        /// sink are replaced by the simulator and the memory store.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// HTTP listen address (overrides api.listen).
        #[arg(long)]
        listen: Option<String>,
        /// Simulated transactions per second (overrides simulator.rate; 0 = as fast as possible).
        #[arg(long)]
        rate: Option<u64>,
        /// Stop after this many transactions (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Generate simulated payment messages (every configured source's shape, with labelled fraud
    /// scenarios) to the sources' Kafka topics or to JSON-lines files.
    Generate {
        /// Config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Number of messages, all sources together [default: 10000, or no limit with --duration].
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds of wall time.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
        /// Messages per second of wall time (0 = as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Random seed (default: simulator.seed). Same seed, same bytes.
        #[arg(long)]
        seed: Option<u64>,
        /// Simulated start time, RFC 3339 (default: simulator.start_time).
        #[arg(long, value_name = "RFC3339")]
        start_time: Option<String>,
        /// Simulated transactions per simulated second: how fast the simulated clock runs
        /// [default: the population's own rate, customers x payments per day / 86400].
        #[arg(long)]
        simulated_tps: Option<f64>,
        /// Simulated seconds per wall second. With --rate it sets how fast the simulated clock
        /// runs; without, the rate becomes the population's own rate times this.
        #[arg(long)]
        speedup: Option<f64>,
        /// Generate only this source (repeat, or separate with commas; default: every source
        /// with a simulator shape).
        #[arg(long = "source", value_name = "NAME", value_delimiter = ',')]
        sources: Vec<String>,
        /// Write JSON lines instead of producing to Kafka: to FILE with one source, else one file
        /// per source, <stem>.<source>.<ext> (e.g. gen.card.jsonl).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Also produce the delayed label feedback (chargebacks, PIX MED and transfer fraud
        /// claims, days of simulated time after the fraud): to --labels-topic, or with --output to
        /// <stem>.labels.<ext>.
        #[arg(long)]
        labels: bool,
        /// Topic of the label feedback (implies --labels) [default: labels.topic of the config].
        /// With `[labels] enabled = true` in the config, labels are generated without --labels.
        #[arg(long, value_name = "TOPIC")]
        labels_topic: Option<String>,
        /// Shortest report delay, simulated days [default: 3].
        #[arg(long, value_name = "DAYS")]
        label_delay_min_days: Option<f64>,
        /// Longest report delay, simulated days [default: 45].
        #[arg(long, value_name = "DAYS")]
        label_delay_max_days: Option<f64>,
        /// Do not create missing topics.
        #[arg(long)]
        no_create_topics: bool,
        /// No progress line on stderr.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Run the same SQL offline over JSON-lines files of source messages and write every
    /// transaction with its features, score, rule hits and decision to Parquet.
    Replay {
        /// Config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Input file of one source: SOURCE=PATH, or PATH named <stem>.<source>.jsonl (repeat for
        /// several sources).
        #[arg(long, required = true)]
        input: Vec<String>,
        /// Label feedback (JSON lines with transaction_id, label, fraud_scenario, reported_at),
        /// joined as the columns label, label_scenario, label_reported_at.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Parquet file to write.
        #[arg(long)]
        output: PathBuf,
        /// Ignore the `[model]` section: score NULL, decisions from the rules only (the
        /// rules-only baseline, and a training set that does not depend on a deployed model).
        #[arg(long)]
        no_model: bool,
    },
    /// Measure the engine with the shipped SQL (figures for BENCHMARKS.md).
    Bench {
        /// What to measure: `engine`, `model` (rows scored per second per core at each
        /// `--batch` size, against the raw ONNX Runtime call on a pre-built tensor), `sink` (the
        /// PostgreSQL sink against `psql \\copy` of the same rows) or `e2e` (Kafka to PostgreSQL
        /// with `--rows` messages).
        #[arg(default_value = "engine")]
        what: String,
        /// Config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Simulated card transactions per run.
        #[arg(long, default_value_t = 500_000)]
        rows: usize,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Rows per micro-batch (`engine`: the first value); `model`: comma-separated sizes.
        #[arg(long, default_value = "10000", value_delimiter = ',')]
        batch: Vec<usize>,
        /// `engine`: simulated transactions per simulated second (0: the population's own rate,
        /// as in the training data; higher compresses time, so every entity's windows hold more
        /// rows).
        #[arg(long, default_value_t = 0.0)]
        simulated_tps: f64,
    },
    /// Validate the config file and SQL files without starting anything; lists every problem.
    Check {
        /// Config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,rskafka=warn,sqlx::postgres::notice=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Check { config } => {
            let problems = app::check(&config).await;
            if problems.is_empty() {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            } else {
                for p in &problems {
                    eprintln!("{}", p.trim_end());
                }
                let n = problems.len();
                eprintln!("{n} problem{} found", if n == 1 { "" } else { "s" });
                ExitCode::from(2)
            }
        }
        Command::Replay {
            config,
            input,
            labels,
            output,
            no_model,
        } => {
            let mut config = match app::load_config(&config) {
                Ok(c) => c,
                Err(e) => return fail_config(e),
            };
            if no_model {
                config.model = None;
            }
            let inputs: Result<Vec<_>, _> = input
                .iter()
                .map(|i| payguard::replay::parse_input(&config, i))
                .collect();
            let inputs = match inputs {
                Ok(i) => i,
                Err(e) => return fail_config(e.into()),
            };
            let started = std::time::Instant::now();
            match payguard::replay::replay(&config, &inputs, labels.as_deref(), &output).await {
                Ok(s) => {
                    let mut decisions: Vec<_> = s.decisions.iter().collect();
                    decisions.sort();
                    eprintln!(
                        "replayed {} messages in {:.1}s: {} rows to {} ({} dead letters, {} labelled fraud), decisions {:?}",
                        s.messages,
                        started.elapsed().as_secs_f64(),
                        s.rows,
                        output.display(),
                        s.dead_letters,
                        s.labelled_fraud,
                        decisions
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => finish(Err(e.into())),
            }
        }
        Command::Bench {
            what,
            config,
            rows,
            runs,
            batch,
            simulated_tps,
        } => {
            if !["engine", "model", "sink", "e2e"].contains(&what.as_str()) {
                eprintln!("unknown benchmark {what:?}; known: engine, model, sink, e2e");
                return ExitCode::from(2);
            }
            let path = config.clone();
            let config = match app::load_config(&config) {
                Ok(c) => c,
                Err(e) => return fail_config(e),
            };
            if batch.is_empty() || batch.contains(&0) {
                eprintln!("--batch sizes must be at least 1");
                return ExitCode::from(2);
            }
            if what == "model" {
                return match payguard::bench::model(&config, rows, runs, &batch).await {
                    Ok(b) => {
                        println!("{}", payguard::bench::model_report(&b, &path));
                        ExitCode::SUCCESS
                    }
                    Err(e) => finish(Err(e.into())),
                };
            }
            let batch = batch[0];
            let report = match what.as_str() {
                "sink" => payguard::bench::sink(&config, rows, runs, batch)
                    .await
                    .map(|b| payguard::bench::sink_report(&b, &path)),
                "e2e" => payguard::bench::e2e(&config, rows as u64, runs)
                    .await
                    .map(|b| payguard::bench::e2e_report(&b, &path)),
                _ => payguard::bench::engine(&config, rows, runs, batch, simulated_tps)
                    .await
                    .map(|b| payguard::bench::report(&b, &path)),
            };
            match report {
                Ok(r) => {
                    println!("{r}");
                    ExitCode::SUCCESS
                }
                Err(e) => finish(Err(e.into())),
            }
        }
        Command::Run {
            config,
            stop_at_end,
        } => {
            let config = match app::load_config(&config) {
                Ok(c) => c,
                Err(e) => return fail_config(e),
            };
            let opts = RunOptions {
                stop_at_end,
                max_messages: None,
                ..Default::default()
            };
            finish(app::run(config, opts).await.map(|_| ()))
        }
        Command::Demo {
            config,
            listen,
            rate,
            count,
        } => {
            let loaded = match config {
                Some(path) => app::load_config(&path).map(|mut c| {
                    c.pipeline.input = payguard::config::InputKind::Simulator;
                    c.pipeline.sink = payguard::config::SinkKind::Memory;
                    c
                }),
                None => {
                    payguard::config::demo_default(&std::env::current_dir().unwrap_or_default())
                        .map_err(|e| anyhow::anyhow!("{e}"))
                }
            };
            let mut config = match loaded {
                Ok(c) => c,
                Err(e) => return fail_config(e),
            };
            if let Some(l) = listen {
                config.api.listen = l;
            }
            if let Some(r) = rate {
                config.simulator.rate = r;
            }
            config.api.enabled = true;
            // The demo needs nothing but Rust: without the ONNX Runtime library it runs on rules.
            if let Some(m) = &config.model
                && let Err(e) =
                    payguard::model::environment(&payguard::model::library_path(&config, m))
            {
                eprintln!("payguard demo: {e}; running without the model (score NULL)");
                config.model = None;
            }
            eprintln!(
                "payguard demo: simulator -> SQL -> memory store; live page at http://{}/ (Ctrl-C stops)",
                config.api.listen
            );
            let opts = RunOptions {
                stop_at_end: false,
                max_messages: count,
                ..Default::default()
            };
            finish(app::run(config, opts).await.map(|_| ()))
        }
        Command::Generate {
            config,
            count,
            duration,
            rate,
            seed,
            start_time,
            simulated_tps,
            speedup,
            sources,
            output,
            labels,
            labels_topic,
            label_delay_min_days,
            label_delay_max_days,
            no_create_topics,
            quiet,
        } => {
            let config = match app::load_config(&config) {
                Ok(c) => c,
                Err(e) => return fail_config(e),
            };
            let mut params = SimulatorParams {
                // A config that consumes labels gets them generated too.
                label_feedback: labels || labels_topic.is_some() || config.labels.enabled,
                ..Default::default()
            };
            if let Some(d) = label_delay_min_days {
                params.label_delay_min_days = d;
            }
            if let Some(d) = label_delay_max_days {
                params.label_delay_max_days = d;
            }
            if !(0.0..=params.label_delay_max_days).contains(&params.label_delay_min_days) {
                eprintln!("error: label delays must satisfy 0 <= min <= max (days)");
                return ExitCode::from(2);
            }
            let duration = match duration {
                Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
                Some(_) => {
                    eprintln!("error: --duration must be a positive number of seconds");
                    return ExitCode::from(2);
                }
                None => None,
            };
            let count = count.unwrap_or(if duration.is_some() { u64::MAX } else { 10_000 });
            let opts = GenerateOptions {
                count,
                rate,
                seed,
                simulated_tps: simulated_tps.unwrap_or(0.0),
                output: match output {
                    Some(p) => GenerateOutput::File(p),
                    None => GenerateOutput::Kafka {
                        create_topics: !no_create_topics,
                    },
                },
                progress: !quiet,
                duration,
                start_time,
                speedup,
                sources,
                labels_topic: labels_topic.unwrap_or_else(|| config.labels.topic.clone()),
                params,
            };
            finish(app::generate(&config, &opts).await.map(|_| ()))
        }
    }
}

fn fail_config(e: anyhow::Error) -> ExitCode {
    eprintln!("{}", format!("{e:#}").trim_end());
    ExitCode::from(2)
}

fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
