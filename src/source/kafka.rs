//! Kafka input and output with rskafka.
//!
//! rskafka has no consumer groups: Payguard reads every partition of every source topic itself and
//! keeps the offsets in the database, committed with the results. One fetch task per partition
//! sends [`Chunk`]s into the bounded chunk channel (backpressure stops fetching when the pipeline is
//! behind). Broker errors are retried with exponential backoff, at the same offset, forever or until
//! shutdown: a broker restart loses nothing and skips nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rskafka::BackoffConfig;
use rskafka::client::error::{Error as KafkaClientError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Chunk;
use crate::config::{KafkaConfig, StartFrom};
use crate::decode::RawMessage;
use crate::metrics::Metrics;

/// Errors of the Kafka input and output.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// Could not connect or talk to the brokers.
    #[error("kafka ({brokers}): {source}")]
    Client {
        /// Bootstrap brokers.
        brokers: String,
        /// Underlying error.
        #[source]
        source: KafkaClientError,
    },
    /// A topic has no partitions (it does not exist).
    #[error(
        "kafka topic {0:?} does not exist (create it, or run `payguard generate --create-topics`)"
    )]
    NoTopic(String),
    /// Stopped by shutdown while waiting for the broker.
    #[error("cancelled while waiting for the broker")]
    Cancelled,
    /// The TLS files of `[kafka.tls]` could not be used.
    #[error("kafka.tls: {0}")]
    Tls(String),
}

/// The rustls client config of `[kafka.tls]`: the brokers' CA, and a client certificate when
/// configured. Errors name the file.
fn tls_config(
    tls: &crate::config::KafkaTlsConfig,
    resolve: impl Fn(&std::path::Path) -> std::path::PathBuf,
) -> Result<std::sync::Arc<tokio_rustls::rustls::ClientConfig>, KafkaError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = resolve(&tls.ca_file);
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            KafkaError::Tls(format!("{}: not a PEM certificate file: {e}", ca.display()))
        })?;
    for c in certs {
        roots
            .add(c)
            .map_err(|e| KafkaError::Tls(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(KafkaError::Tls(format!(
            "{}: holds no certificate",
            ca.display()
        )));
    }
    // ring, as the TLS of the sink and the API (see src/api/tls.rs).
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| KafkaError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = if tls.cert_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let (cert, key) = (resolve(&tls.cert_file), resolve(&tls.key_file));
        let chain = CertificateDer::pem_file_iter(&cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                KafkaError::Tls(format!(
                    "{}: not a PEM certificate chain: {e}",
                    cert.display()
                ))
            })?;
        let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
            KafkaError::Tls(format!("{}: not a PEM private key: {e}", key.display()))
        })?;
        builder
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| KafkaError::Tls(format!("{}: {e}", cert.display())))?
    };
    Ok(std::sync::Arc::new(config))
}

/// Exponential backoff with a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Start at `initial`, double up to `max`.
    pub fn new(initial_ms: u64, max_ms: u64) -> Self {
        let initial = Duration::from_millis(initial_ms.max(1));
        Self {
            initial,
            max: Duration::from_millis(max_ms.max(initial_ms)),
            current: initial,
        }
    }

    /// The next delay (and double it for the time after).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Connect to the brokers (retrying with backoff until `cancel`).
pub async fn connect(cfg: &KafkaConfig, cancel: &CancellationToken) -> Result<Client, KafkaError> {
    connect_from(cfg, std::path::Path::new("."), cancel).await
}

/// [`connect`], with the `[kafka.tls]` files relative to `base` (the config's directory).
pub async fn connect_from(
    cfg: &KafkaConfig,
    base: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<Client, KafkaError> {
    let mut backoff = Backoff::new(cfg.retry_initial_ms, cfg.retry_max_ms);
    let tls = cfg
        .tls
        .as_ref()
        .map(|t| tls_config(t, |p| base.join(p)))
        .transpose()?;
    let sasl = cfg.sasl.as_ref().map(|s| {
        use rskafka::client::{Credentials, SaslConfig};
        let c = Credentials::new(s.username.clone(), s.password.clone());
        match s.mechanism {
            crate::config::SaslMechanism::Plain => SaslConfig::Plain(c),
            crate::config::SaslMechanism::ScramSha256 => SaslConfig::ScramSha256(c),
            crate::config::SaslMechanism::ScramSha512 => SaslConfig::ScramSha512(c),
        }
    });
    loop {
        let mut builder = ClientBuilder::new(cfg.brokers.clone())
            .client_id(cfg.client_id.clone())
            .max_message_size(cfg.fetch_max_bytes as usize * 2 + 1024 * 1024)
            .backoff_config(BackoffConfig {
                init_backoff: Duration::from_millis(cfg.retry_initial_ms),
                max_backoff: Duration::from_millis(cfg.retry_max_ms),
                base: 2.0,
                // Let errors come up to us after a while, so they are logged and counted.
                deadline: Some(Duration::from_secs(10)),
            });
        if let Some(t) = &tls {
            builder = builder.tls_config(t.clone());
        }
        if let Some(s) = &sasl {
            builder = builder.sasl_config(s.clone());
        }
        let attempt = tokio::select! {
            r = builder.build() => r,
            _ = cancel.cancelled() => return Err(KafkaError::Cancelled),
        };
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) => {
                let d = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?d, "cannot reach Kafka brokers");
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => return Err(KafkaError::Cancelled),
                }
            }
        }
    }
}

fn client_err(cfg: &KafkaConfig) -> impl Fn(KafkaClientError) -> KafkaError + '_ {
    move |source| KafkaError::Client {
        brokers: cfg.brokers.join(","),
        source,
    }
}

/// Partitions of each topic, in order.
pub async fn partitions(
    client: &Client,
    cfg: &KafkaConfig,
    topics: &[String],
) -> Result<Vec<Vec<i32>>, KafkaError> {
    let listed = client.list_topics().await.map_err(client_err(cfg))?;
    topics
        .iter()
        .map(|t| {
            listed
                .iter()
                .find(|l| &l.name == t)
                .map(|l| l.partitions.iter().copied().collect::<Vec<_>>())
                .filter(|p| !p.is_empty())
                .ok_or_else(|| KafkaError::NoTopic(t.clone()))
        })
        .collect()
}

/// Create a topic if it does not exist yet, and wait until the broker lists it with its
/// partitions: the controller answers a creation before the metadata every client reads has it,
/// so a producer opened right after could still be told the topic does not exist.
pub async fn ensure_topic(
    client: &Client,
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> Result<(), KafkaError> {
    // Listed with at least `min` partitions.
    let listed = |topics: &[rskafka::topic::Topic], min: usize| {
        topics
            .iter()
            .any(|t| t.name == topic && t.partitions.len() >= min.max(1))
    };
    if listed(&client.list_topics().await.map_err(client_err(cfg))?, 1) {
        return Ok(());
    }
    let controller = client.controller_client().map_err(client_err(cfg))?;
    // Created here: all its partitions; created by someone else meanwhile: any.
    let min = match controller.create_topic(topic, partitions, 1, 10_000).await {
        Ok(()) => usize::try_from(partitions).unwrap_or(1),
        Err(KafkaClientError::ServerError {
            protocol_error: ProtocolError::TopicAlreadyExists,
            ..
        }) => 1,
        Err(e) => return Err(client_err(cfg)(e)),
    };
    let mut backoff = Backoff::new(20, 500);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if listed(&client.list_topics().await.map_err(client_err(cfg))?, min) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(KafkaError::NoTopic(topic.to_string()));
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// A partition to consume: where to start and, optionally, where to stop.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Source index.
    pub source: usize,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Stored offset, if any.
    pub stored: Option<i64>,
    /// Stop once this offset is reached (the end offset at start, for `--stop-at-end`).
    pub stop_at: Option<i64>,
}

/// Resolve where a partition starts: its stored offset, else earliest/latest per config.
async fn start_offset(
    pc: &PartitionClient,
    stored: Option<i64>,
    start_from: StartFrom,
) -> Result<i64, KafkaClientError> {
    match stored {
        Some(o) => Ok(o),
        None => match start_from {
            StartFrom::Earliest => pc.get_offset(OffsetAt::Earliest).await,
            StartFrom::Latest => pc.get_offset(OffsetAt::Latest).await,
        },
    }
}

/// End offset (high watermark) of a partition.
pub async fn end_offset(
    client: &Client,
    cfg: &KafkaConfig,
    topic: &str,
    partition: i32,
) -> Result<i64, KafkaError> {
    let pc = client
        .partition_client(topic, partition, UnknownTopicHandling::Retry)
        .await
        .map_err(client_err(cfg))?;
    pc.get_offset(OffsetAt::Latest)
        .await
        .map_err(client_err(cfg))
}

/// Fetch one partition into `out` until cancelled, until `stop_at` is reached, or until the
/// channel closes. Errors are retried with backoff at the same offset.
pub async fn fetch_partition(
    client: Arc<Client>,
    cfg: KafkaConfig,
    a: Assignment,
    out: mpsc::Sender<Chunk>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(cfg.retry_initial_ms, cfg.retry_max_ms);
    let label = format!("{}/{}", a.topic, a.partition);
    // Connect the partition client and find the start offset.
    let (pc, mut offset) = loop {
        let attempt = async {
            let pc = client
                .partition_client(a.topic.clone(), a.partition, UnknownTopicHandling::Retry)
                .await?;
            let off = start_offset(&pc, a.stored, cfg.start_from).await?;
            Ok::<_, KafkaClientError>((pc, off))
        };
        let r = tokio::select! {
            r = attempt => r,
            _ = cancel.cancelled() => return,
        };
        match r {
            Ok(v) => break v,
            Err(e) => {
                metrics.broker_errors.inc();
                let d = backoff.next_delay();
                tracing::warn!(partition = %label, error = %e, retry_in = ?d, "cannot open partition");
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    };
    backoff.reset();
    tracing::info!(partition = %label, offset, stop_at = ?a.stop_at, "consuming");
    let source_name = metrics.source_name(a.source);
    loop {
        if a.stop_at.is_some_and(|s| offset >= s) {
            tracing::info!(partition = %label, offset, "reached the end offset");
            return;
        }
        let fetch_started = std::time::Instant::now();
        let fetched = tokio::select! {
            r = pc.fetch_records(offset, 1..cfg.fetch_max_bytes, cfg.fetch_max_wait_ms) => r,
            _ = cancel.cancelled() => return,
        };
        metrics
            .fetch_time
            .observe(&[&source_name], fetch_started.elapsed().as_secs_f64());
        match fetched {
            Ok((records, high_watermark)) => {
                backoff.reset();
                metrics.set_lag(&a.topic, a.partition, high_watermark - offset);
                let records: Vec<_> = records.into_iter().filter(|r| r.offset >= offset).collect();
                let Some(last) = records.last() else { continue };
                let next_offset = last.offset + 1;
                let messages: Vec<RawMessage> = records
                    .into_iter()
                    .filter(|r| a.stop_at.is_none_or(|s| r.offset < s))
                    .map(|r| RawMessage {
                        partition: a.partition,
                        offset: r.offset,
                        key: r.record.key,
                        value: r.record.value,
                        timestamp_ms: r.record.timestamp.timestamp_millis(),
                    })
                    .collect();
                let next_offset = match a.stop_at {
                    Some(s) => next_offset.min(s),
                    None => next_offset,
                };
                metrics.messages_received(a.source, a.partition, messages.len() as u64);
                let chunk = Chunk {
                    source: a.source,
                    partition: a.partition,
                    messages,
                    next_offset,
                };
                offset = next_offset;
                tokio::select! {
                    r = out.send(chunk) => if r.is_err() { return },
                    _ = cancel.cancelled() => return,
                }
            }
            Err(KafkaClientError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            }) => {
                // The broker no longer has (or never had) this offset: retention removed it, or
                // the topic was recreated. Continue at the earliest offset it has, loudly.
                match pc.get_offset(OffsetAt::Earliest).await {
                    Ok(earliest) => {
                        tracing::error!(partition = %label, offset, earliest,
                            "offset out of range; continuing at the earliest offset the broker keeps");
                        metrics.offset_resets.inc();
                        offset = earliest;
                    }
                    Err(e) => {
                        metrics.broker_errors.inc();
                        tracing::warn!(partition = %label, error = %e, "cannot read earliest offset");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
            Err(e) => {
                metrics.broker_errors.inc();
                let d = backoff.next_delay();
                tracing::warn!(partition = %label, offset, error = %e, retry_in = ?d, "fetch failed");
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Kafka's default partitioner (murmur2 of the key, positive, modulo the partition count), so that
/// Payguard places a key where the Java client and kcat would.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

/// Kafka's murmur2 (seed 0x9747b28c).
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ len as u32;
    let mut chunks = data.chunks_exact(4);
    for c in chunks.by_ref() {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Producer for one topic: a partition client per partition.
pub struct TopicProducer {
    topic: String,
    partitions: Vec<PartitionClient>,
}

impl TopicProducer {
    /// Open partition clients for every partition of `topic`.
    pub async fn new(client: &Client, cfg: &KafkaConfig, topic: &str) -> Result<Self, KafkaError> {
        let parts = partitions(client, cfg, &[topic.to_string()])
            .await?
            .remove(0);
        let mut clients = Vec::with_capacity(parts.len());
        for p in parts {
            clients.push(
                client
                    .partition_client(topic.to_string(), p, UnknownTopicHandling::Retry)
                    .await
                    .map_err(client_err(cfg))?,
            );
        }
        Ok(Self {
            topic: topic.to_string(),
            partitions: clients,
        })
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> i32 {
        self.partitions.len() as i32
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produce records already grouped by partition index, all partitions concurrently.
    pub async fn produce(
        &self,
        by_partition: HashMap<i32, Vec<Record>>,
    ) -> Result<(), KafkaClientError> {
        let futs = by_partition.into_iter().map(|(p, records)| {
            let pc = &self.partitions[p as usize];
            async move {
                if records.is_empty() {
                    return Ok(());
                }
                pc.produce(records, Compression::NoCompression)
                    .await
                    .map(|_| ())
            }
        });
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Reference values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut b = Backoff::new(100, 350);
        let d: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
