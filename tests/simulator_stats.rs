//! Statistics of the payment simulator, read back from the JSON it writes (library API, no
//! services): the fraud rate follows the configuration, every scenario shows its signature, labels
//! stay out of the canonical transactions, chargebacks come after their delay, and the same seed
//! gives the same bytes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use payguard::config::{Config, SourceConfig};
use payguard::decode::{JsonDecoder, RawMessage};
use payguard::engine::canonical::COLUMNS;
use payguard::engine::sql::CompiledQuery;
use payguard::source::simulator::{Scenario, Simulator, SimulatorParams, ip_country};
use serde::Deserialize;

fn config() -> Config {
    payguard::config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap()
}

/// The shipped sources, with only `shapes` generated (all when empty).
fn sources(config: &Config, shapes: &[&str]) -> Vec<SourceConfig> {
    let mut s = config.sources.clone();
    if !shapes.is_empty() {
        for src in &mut s {
            if !shapes.contains(&src.simulator.as_str()) {
                src.simulator.clear();
            }
        }
    }
    s
}

/// Every field of every shape the tests look at (absent ones are `None`).
#[derive(Debug, Deserialize)]
struct Msg {
    // card
    auth_id: Option<String>,
    ts: Option<String>,
    pan_token: Option<String>,
    terminal_id: Option<String>,
    entry_mode: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    // card, wallet
    merchant_id: Option<String>,
    currency: Option<String>,
    // pix
    end_to_end_id: Option<String>,
    created_at: Option<String>,
    payer_key: Option<String>,
    payer_ispb: Option<String>,
    payer_branch: Option<String>,
    payer_account: Option<String>,
    payee_ispb: Option<String>,
    payee_branch: Option<String>,
    payee_account: Option<String>,
    // wallet
    payment_id: Option<String>,
    created: Option<String>,
    amount_minor: Option<i64>,
    // transfer
    transfer_id: Option<String>,
    requested_at: Option<i64>,
    customer_id: Option<String>,
    // several
    customer_ref: Option<String>,
    amount: Option<serde_json::Value>,
    device_id: Option<String>,
    ip: Option<String>,
    is_fraud: bool,
    fraud_scenario: Option<String>,
}

/// A parsed message with what the tests derive from it.
#[derive(Debug)]
struct Tx {
    source: String,
    id: String,
    time_ms: i64,
    cents: i64,
    customer: Option<String>,
    m: Msg,
}

impl Tx {
    fn scenario(&self) -> Option<Scenario> {
        self.m
            .fraud_scenario
            .as_deref()
            .map(|s| Scenario::from_name(s).unwrap())
    }

    fn card_present(&self) -> bool {
        self.source == "card" && self.m.entry_mode.as_deref() != Some("ecommerce")
    }
}

fn rfc3339_ms(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_millis()
}

/// Cents of `"12.30"`, `12.3` or minor units.
fn cents(v: &serde_json::Value) -> i64 {
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let (units, frac) = s.split_once('.').unwrap_or((&s, "0"));
    let frac = format!("{frac:0<2}");
    units.parse::<i64>().unwrap() * 100 + frac[..2].parse::<i64>().unwrap()
}

fn parse(source: &str, value: &[u8]) -> Tx {
    let m: Msg = serde_json::from_slice(value)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(value)));
    let (id, time_ms, cents) = match source {
        "card" => (
            m.auth_id.clone().unwrap(),
            rfc3339_ms(m.ts.as_deref().unwrap()),
            cents(m.amount.as_ref().unwrap()),
        ),
        "pix" => (
            m.end_to_end_id.clone().unwrap(),
            rfc3339_ms(m.created_at.as_deref().unwrap()),
            cents(m.amount.as_ref().unwrap()),
        ),
        "wallet" => (
            m.payment_id.clone().unwrap(),
            rfc3339_ms(m.created.as_deref().unwrap()),
            m.amount_minor.unwrap(),
        ),
        "transfer" => (
            m.transfer_id.clone().unwrap(),
            m.requested_at.unwrap(),
            cents(m.amount.as_ref().unwrap()),
        ),
        other => panic!("unknown source {other}"),
    };
    let customer = m.customer_ref.clone().or_else(|| m.customer_id.clone());
    Tx {
        source: source.to_string(),
        id,
        time_ms,
        cents,
        customer,
        m,
    }
}

/// Generate `n` messages and parse them all.
fn run(config: &Config, srcs: &[SourceConfig], seed: u64, n: usize) -> Vec<Tx> {
    let mut sim = Simulator::new(&config.simulator, srcs, seed, 0.0).unwrap();
    (0..n)
        .map(|_| {
            let g = sim.next_message();
            let tx = parse(&srcs[g.source].name, &g.value);
            assert_eq!(tx.time_ms, g.event_time_ms, "event time of {}", tx.id);
            assert_eq!(tx.m.is_fraud, g.is_fraud);
            tx
        })
        .collect()
}

fn km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let h = ((p2 - p1) / 2.0).sin().powi(2)
        + p1.cos() * p2.cos() * ((lon2 - lon1).to_radians() / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// Split one entity's time-ordered messages into episodes at gaps longer than `gap_ms`.
fn episodes<'a>(txs: &[&'a Tx], gap_ms: i64) -> Vec<Vec<&'a Tx>> {
    let mut out: Vec<Vec<&Tx>> = Vec::new();
    for t in txs {
        match out.last_mut() {
            Some(e) if t.time_ms - e.last().unwrap().time_ms <= gap_ms => e.push(t),
            _ => out.push(vec![t]),
        }
    }
    out
}

fn group_by(txs: &[Tx], f: impl Fn(&Tx) -> Option<String>) -> HashMap<String, Vec<&Tx>> {
    let mut m: HashMap<String, Vec<&Tx>> = HashMap::new();
    for t in txs {
        if let Some(k) = f(t) {
            m.entry(k).or_default().push(t);
        }
    }
    m
}

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

#[test]
fn fraud_rate_tracks_the_configured_rate() {
    let mut config = config();
    let srcs = sources(&config, &[]);
    for (rate, tolerance) in [(0.005, 0.15), (0.02, 0.08)] {
        config.simulator.fraud_rate = rate;
        let mut sim = Simulator::new(&config.simulator, &srcs, 42, 0.0).unwrap();
        let n = 200_000;
        let mut buf = Vec::new();
        let fraud = (0..n)
            .filter(|_| {
                buf.clear();
                sim.next_into(&mut buf).is_fraud
            })
            .count();
        let got = fraud as f64 / n as f64;
        assert!(
            (got - rate).abs() <= tolerance * rate,
            "fraud_rate {rate}: got {got:.5} ({fraud} of {n}), tolerance {tolerance}"
        );
    }
    config.simulator.fraud_rate = 0.0;
    let mut sim = Simulator::new(&config.simulator, &srcs, 42, 0.0).unwrap();
    assert!((0..50_000).all(|_| !sim.next_message().is_fraud));
}

#[test]
fn every_scenario_shows_its_signature() {
    let config = config();
    let srcs = sources(&config, &[]);
    let txs = run(&config, &srcs, 42, 400_000);
    let end = txs.last().unwrap().time_ms;
    let mut by_scenario: HashMap<Scenario, Vec<&Tx>> = HashMap::new();
    for t in &txs {
        if let Some(s) = t.scenario() {
            by_scenario.entry(s).or_default().push(t);
        }
        assert_eq!(t.m.is_fraud, t.m.fraud_scenario.is_some());
    }
    for s in Scenario::ALL {
        assert!(
            by_scenario.get(&s).is_some_and(|v| v.len() >= 20),
            "{} has too few messages: {:?}",
            s.name(),
            by_scenario.get(&s).map(Vec::len)
        );
    }
    let genuine_cards = group_by(&txs, |t| {
        (t.source == "card" && !t.m.is_fraud).then(|| t.m.pan_token.clone().unwrap())
    });

    // Card testing: >= 5 charges under 5.00 on one card, online, minutes apart.
    let testing = group_by(&txs, |t| {
        (t.scenario() == Some(Scenario::CardTesting)).then(|| t.m.pan_token.clone().unwrap())
    });
    let mut n_testing = 0;
    for (card, txs) in &testing {
        for ep in episodes(txs, 2 * HOUR) {
            if ep.last().unwrap().time_ms > end - HOUR {
                continue; // may be cut by the end of the run
            }
            n_testing += 1;
            assert!(
                ep.len() >= 5,
                "card testing on {card}: only {} charges",
                ep.len()
            );
            for w in ep.windows(2) {
                let gap = w[1].time_ms - w[0].time_ms;
                assert!(
                    (10_000..=10 * MIN).contains(&gap),
                    "card testing gap {gap} ms on {card}"
                );
            }
            for t in &ep {
                assert!(t.cents < 500, "card testing charge {} on {card}", t.cents);
                assert_eq!(t.m.entry_mode.as_deref(), Some("ecommerce"));
            }
        }
    }
    assert!(n_testing >= 10, "{n_testing} card testing episodes");
    // ... which genuine cardholders never look like.
    for (card, txs) in &genuine_cards {
        let tiny: Vec<&&Tx> = txs.iter().filter(|t| t.cents < 500).collect();
        for w in tiny.windows(5) {
            assert!(
                w[4].time_ms - w[0].time_ms > HOUR,
                "genuine card {card} looks like card testing"
            );
        }
    }

    // Stolen card spree: high amounts at merchants the card never used before.
    let spree = &by_scenario[&Scenario::StolenCardSpree];
    for t in spree {
        let card = t.m.pan_token.as_deref().unwrap();
        let merchant = t.m.merchant_id.as_deref().unwrap();
        assert!(
            t.cents >= 60_000 && t.m.currency.as_deref() == Some("BRL"),
            "spree amount {}",
            t.cents
        );
        let used_before = genuine_cards.get(card).is_some_and(|h| {
            h.iter()
                .any(|g| g.time_ms < t.time_ms && g.m.merchant_id.as_deref() == Some(merchant))
        });
        assert!(
            !used_before,
            "spree on {card} at {merchant}, a merchant it used before"
        );
    }
    let spree_cards = group_by(&txs, |t| {
        (t.scenario() == Some(Scenario::StolenCardSpree)).then(|| t.m.pan_token.clone().unwrap())
    });
    assert!(
        spree_cards
            .values()
            .all(|v| v.len() >= 3 || v.last().unwrap().time_ms > end - 5 * HOUR)
    );

    // Account takeover: a new device and a foreign IP, a small probe, then large transfers.
    let mut history: HashMap<&str, Vec<&Tx>> = HashMap::new();
    for t in &txs {
        if !t.m.is_fraud
            && let Some(c) = &t.customer
        {
            history.entry(c.as_str()).or_default().push(t);
        }
    }
    let ato = group_by(&txs, |t| {
        (t.scenario() == Some(Scenario::AccountTakeover)).then(|| t.customer.clone().unwrap())
    });
    let mut n_ato = 0;
    for (customer, txs) in &ato {
        for ep in episodes(txs, 3 * HOUR) {
            let first = ep[0];
            let device = first.m.device_id.as_deref().unwrap();
            let ip = first.m.ip.as_deref().unwrap();
            assert_ne!(
                ip_country(ip),
                Some("BR"),
                "ATO of {customer} from a Brazilian IP {ip}"
            );
            assert!(ip_country(ip).is_some());
            for t in &ep {
                assert_eq!(t.m.device_id.as_deref(), Some(device));
                assert_eq!(t.m.ip.as_deref(), Some(ip));
            }
            let known = history
                .get(customer.as_str())
                .map_or(&[][..], Vec::as_slice);
            for k in known.iter().filter(|k| k.time_ms < first.time_ms) {
                assert_ne!(
                    k.m.device_id.as_deref(),
                    Some(device),
                    "ATO device of {customer} seen before"
                );
                if let Some(ip) = &k.m.ip {
                    assert_eq!(ip_country(ip), Some("BR"), "genuine IP of {customer}");
                }
            }
            assert!(first.cents <= 5_000, "ATO probe of {} cents", first.cents);
            if ep.len() >= 2 {
                n_ato += 1;
                let large = ep[1..].iter().map(|t| t.cents).min().unwrap();
                assert!(large >= 300_000, "ATO transfer of {large} cents");
                assert!(ep.last().unwrap().time_ms - first.time_ms < 2 * HOUR);
            }
        }
    }
    assert!(n_ato >= 10, "{n_ato} account takeovers");

    // Compromised terminal: cards used at one terminal turn fraudulent elsewhere, later.
    let skimmed = group_by(&txs, |t| {
        (t.scenario() == Some(Scenario::CompromisedTerminal))
            .then(|| t.m.pan_token.clone().unwrap())
    });
    // Per terminal: the skimmed cards that used it (genuinely) before their first fraud.
    let mut at_terminal: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (card, frauds) in &skimmed {
        let first = frauds[0].time_ms;
        for g in genuine_cards.get(card).into_iter().flatten() {
            if g.time_ms < first && g.card_present() {
                at_terminal
                    .entry(g.m.terminal_id.as_deref().unwrap())
                    .or_default()
                    .insert(card);
            }
        }
    }
    let mut n_skimmed = 0;
    for (card, frauds) in &skimmed {
        let first = frauds[0];
        if first.time_ms > end - 2 * DAY {
            continue; // its episode may not be over
        }
        n_skimmed += 1;
        // The common point of purchase: the terminal most skimmed cards share.
        let point = genuine_cards[card]
            .iter()
            .filter(|g| g.time_ms < first.time_ms && g.card_present())
            .max_by_key(|g| at_terminal[g.m.terminal_id.as_deref().unwrap()].len())
            .filter(|g| at_terminal[g.m.terminal_id.as_deref().unwrap()].len() >= 4)
            .unwrap_or_else(|| {
                panic!("skimmed card {card} shares no terminal with other skimmed cards")
            });
        assert!(
            first.time_ms - point.time_ms >= 6 * HOUR,
            "cash-out of {card} too soon"
        );
        for f in frauds {
            assert_ne!(
                f.m.terminal_id, point.m.terminal_id,
                "cash-out at the skimmed terminal"
            );
            assert_eq!(f.m.entry_mode.as_deref(), Some("magstripe"));
        }
    }
    assert!(n_skimmed >= 20, "{n_skimmed} skimmed cards");

    // Impossible travel: the same card present > 500 km away within minutes.
    let travel = group_by(&txs, |t| {
        (t.scenario() == Some(Scenario::ImpossibleTravel)).then(|| t.m.pan_token.clone().unwrap())
    });
    let card_present = group_by(&txs, |t| {
        t.card_present().then(|| t.m.pan_token.clone().unwrap())
    });
    let mut n_travel = 0;
    for (card, txs) in &travel {
        for ep in episodes(txs, 3 * HOUR) {
            n_travel += 1;
            let f = ep[0];
            assert!(f.card_present());
            let near_in_time = card_present[card]
                .iter()
                .filter(|t| t.time_ms < f.time_ms && f.time_ms - t.time_ms <= 30 * MIN)
                .any(|t| {
                    km(
                        t.m.lat.unwrap(),
                        t.m.lon.unwrap(),
                        f.m.lat.unwrap(),
                        f.m.lon.unwrap(),
                    ) > 500.0
                });
            assert!(
                near_in_time,
                "impossible travel of {card} without a distant payment just before"
            );
        }
    }
    assert!(n_travel >= 10, "{n_travel} impossible travels");
    // Genuine cardholders travel too, but not faster than planes.
    for (card, txs) in &genuine_cards {
        let present: Vec<&&Tx> = txs.iter().filter(|t| t.card_present()).collect();
        for w in present.windows(2) {
            let d = km(
                w[0].m.lat.unwrap(),
                w[0].m.lon.unwrap(),
                w[1].m.lat.unwrap(),
                w[1].m.lon.unwrap(),
            );
            assert!(
                d < 500.0 || w[1].time_ms - w[0].time_ms > HOUR,
                "genuine {card}: {d:.0} km too fast"
            );
        }
    }

    // Mules: one account receiving many PIX from distinct payers, then forwarding the money.
    let account = |ispb: &Option<String>, branch: &Option<String>, acc: &Option<String>| {
        format!(
            "{}-{}-{}",
            ispb.as_deref()?,
            branch.as_deref()?,
            acc.as_deref()?
        )
        .into()
    };
    let incoming = group_by(&txs, |t| {
        (t.scenario() == Some(Scenario::MuleAccount))
            .then(|| account(&t.m.payee_ispb, &t.m.payee_branch, &t.m.payee_account))?
    });
    // Mule accounts sending (forwarding) money.
    let outgoing: HashSet<String> = txs
        .iter()
        .filter(|t| t.scenario() == Some(Scenario::MuleAccount))
        .filter_map(|t| account(&t.m.payer_ispb, &t.m.payer_branch, &t.m.payer_account))
        .filter(|payer| incoming.contains_key(payer))
        .collect();
    let mut n_mules = 0;
    for (mule, txs) in &incoming {
        for ep in episodes(txs, 2 * HOUR) {
            let from_victims: Vec<&&Tx> = ep
                .iter()
                .filter(|t| {
                    !outgoing.contains(
                        &account(&t.m.payer_ispb, &t.m.payer_branch, &t.m.payer_account).unwrap(),
                    )
                })
                .collect();
            if from_victims.is_empty() || ep[0].time_ms > end - DAY {
                continue; // money forwarded to this mule by another one, or cut by the end
            }
            n_mules += 1;
            let payers: HashSet<&str> = from_victims
                .iter()
                .map(|t| t.m.payer_key.as_deref().unwrap())
                .collect();
            assert!(
                from_victims.len() >= 8,
                "mule {mule}: {} incoming",
                from_victims.len()
            );
            assert_eq!(
                payers.len(),
                from_victims.len(),
                "mule {mule}: payers repeat"
            );
            assert!(
                outgoing.contains(mule.as_str()),
                "mule {mule} never forwards"
            );
        }
    }
    assert!(n_mules >= 10, "{n_mules} mule episodes");
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let config = config();
    let srcs = sources(&config, &[]);
    let params = SimulatorParams {
        label_feedback: true,
        label_delay_min_days: 0.1,
        label_delay_max_days: 0.5,
        ..Default::default()
    };
    let bytes = |seed: u64| {
        let mut sim =
            Simulator::with_params(&config.simulator, &srcs, seed, 0.0, params.clone()).unwrap();
        let (mut out, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..60_000 {
            let m = sim.next_into(&mut out);
            out.extend_from_slice(m.key.as_bytes());
            out.push(m.source as u8);
            while sim.next_label_into(&mut labels).is_some() {}
        }
        (out, labels)
    };
    let (a, la) = bytes(7);
    let (b, lb) = bytes(7);
    let (c, lc) = bytes(8);
    assert!(a == b && la == lb, "same seed, different bytes");
    assert!(!la.is_empty(), "no label reports");
    assert_ne!(a, c);
    assert_ne!(la, lc);
    // Different seeds: different populations, not just a shifted stream.
    let ids = |v: &[u8]| {
        String::from_utf8_lossy(v)
            .split("\"customer_ref\":\"")
            .skip(1)
            .take(100)
            .map(|s| s[..11].to_string())
            .collect::<Vec<_>>()
    };
    assert_ne!(ids(&a), ids(&c));
}

#[tokio::test]
async fn labels_never_reach_the_canonical_transactions() {
    let config = config();
    for src in &config.sources {
        for label in ["is_fraud", "fraud_scenario"] {
            assert!(
                src.fields.iter().all(|f| f.name != label),
                "source {} declares the label {label}: the mapping could read it",
                src.name
            );
            let sql = std::fs::read_to_string(config.resolve(&src.mapping)).unwrap();
            let code: String = sql
                .lines()
                .map(|l| l.split("--").next().unwrap())
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                !code.contains(label),
                "{} mentions {label}",
                src.mapping.display()
            );
        }
    }
    // Generated messages go through each shipped mapping whole: every message a row, ids and
    // amounts exact, no label column.
    let mut config = config;
    config.simulator.fraud_rate = 0.05;
    let srcs = sources(&config, &[]);
    let mut sim = Simulator::new(&config.simulator, &srcs, 3, 0.0).unwrap();
    let mut per_source: Vec<Vec<RawMessage>> = vec![Vec::new(); srcs.len()];
    let mut expect: Vec<HashMap<String, i64>> = vec![HashMap::new(); srcs.len()];
    let mut fraud = 0;
    for _ in 0..8_000 {
        let g = sim.next_message();
        let tx = parse(&srcs[g.source].name, &g.value);
        fraud += g.is_fraud as usize;
        expect[g.source].insert(tx.id, tx.cents);
        let offset = per_source[g.source].len() as i64;
        per_source[g.source].push(RawMessage {
            partition: 0,
            offset,
            key: Some(g.key),
            value: Some(g.value),
            timestamp_ms: g.event_time_ms,
        });
    }
    assert!(fraud > 100);
    // The canonical columns and the declared attributes (the sources' own signals, e.g.
    // cvv_result), never a label.
    let contract = payguard::engine::canonical::Canonical::of(&config);
    let canonical: HashSet<&str> = contract.columns().iter().map(|c| c.name.as_str()).collect();
    assert!(COLUMNS.iter().all(|c| canonical.contains(c.0)));
    for (i, src) in srcs.iter().enumerate() {
        let decoder = JsonDecoder::new(src, config.kafka.max_message_bytes).unwrap();
        let decoded = decoder.decode(&per_source[i]).unwrap();
        assert!(
            decoded.dead_letters.is_empty(),
            "{}: {:?}",
            src.name,
            decoded.dead_letters.first()
        );
        let file = config.resolve(&src.mapping);
        let q = CompiledQuery::compile_file(&file, "input", decoder.output_schema())
            .await
            .unwrap();
        let out = q.execute(vec![decoded.batch]).await.unwrap();
        let schema = q.schema();
        for f in schema.fields() {
            assert!(
                canonical.contains(f.name().as_str()) || f.name().starts_with('_'),
                "{}: column {} is not canonical",
                src.name,
                f.name()
            );
        }
        let rows: usize = out.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, per_source[i].len(), "{}: rows", src.name);
        let mut seen = 0;
        for b in &out {
            let ids = b.column_by_name("transaction_id").unwrap();
            let ids = datafusion::arrow::array::cast::as_string_array(ids);
            let amounts = b.column_by_name("amount").unwrap();
            let amounts = amounts
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Decimal128Array>()
                .unwrap_or_else(|| panic!("{}: amount is {:?}", src.name, amounts.data_type()));
            assert_eq!(amounts.scale(), 2, "{}", src.name);
            let source = b.column_by_name("source").unwrap();
            let source = datafusion::arrow::array::cast::as_string_array(source);
            for r in 0..b.num_rows() {
                assert_eq!(
                    expect[i].get(ids.value(r)),
                    Some(&(amounts.value(r) as i64)),
                    "{}",
                    src.name
                );
                assert_eq!(source.value(r), src.name);
                seen += 1;
            }
        }
        assert_eq!(seen, expect[i].len());
    }
}

#[test]
fn chargebacks_arrive_only_after_their_delay() {
    let config = config();
    let srcs = sources(&config, &[]);
    let (min_days, max_days) = (1.0, 2.0);
    let params = SimulatorParams {
        label_feedback: true,
        label_delay_min_days: min_days,
        label_delay_max_days: max_days,
        ..Default::default()
    };
    let mut sim = Simulator::with_params(&config.simulator, &srcs, 9, 0.0, params).unwrap();
    let mut fraud: HashMap<String, (i64, String, &'static str)> = HashMap::new();
    let mut reported: HashSet<String> = HashSet::new();
    let mut before = sim.clock_ms();
    let mut buf = Vec::new();
    let mut labels = 0;
    for _ in 0..200_000 {
        let g = sim.next_message();
        let tx = parse(&srcs[g.source].name, &g.value);
        if let Some(s) = tx.scenario() {
            fraud.insert(tx.id.clone(), (tx.time_ms, tx.source.clone(), s.name()));
        }
        loop {
            buf.clear();
            let Some(meta) = sim.next_label_into(&mut buf) else {
                break;
            };
            labels += 1;
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            let id = v["transaction_id"].as_str().unwrap();
            let (tx_ms, source, scenario) = fraud
                .get(id)
                .unwrap_or_else(|| panic!("report of unknown or genuine {id}"));
            let at = rfc3339_ms(v["reported_at"].as_str().unwrap());
            assert_eq!(at, meta.reported_at_ms);
            assert_eq!(rfc3339_ms(v["transaction_time"].as_str().unwrap()), *tx_ms);
            assert_eq!(v["source"].as_str(), Some(source.as_str()));
            assert_eq!(v["fraud_scenario"].as_str(), Some(*scenario));
            assert_eq!(v["label"].as_str(), Some("fraud"));
            let delay = (at - tx_ms) as f64 / DAY as f64;
            assert!(
                (min_days..=max_days + 1e-6).contains(&delay),
                "{id} reported after {delay} days"
            );
            // Emitted as the simulated clock passes the report time, not before and not late.
            assert!(
                at <= g.event_time_ms && at > before,
                "{id}: due {at}, clock {before}..{}",
                g.event_time_ms
            );
            assert!(reported.insert(id.to_string()), "{id} reported twice");
        }
        before = g.event_time_ms;
    }
    assert!(labels > 100, "{labels} reports");
    // About `label_report_share` (0.9) of the fraud old enough to be due is reported.
    let end = sim.clock_ms();
    let due: Vec<&String> = fraud
        .iter()
        .filter(|(_, (t, _, _))| *t + (max_days * DAY as f64) as i64 <= end)
        .map(|(id, _)| id)
        .collect();
    let share = due
        .iter()
        .filter(|id| reported.contains(id.as_str()))
        .count() as f64
        / due.len() as f64;
    assert!(
        due.len() > 200 && (0.84..=0.96).contains(&share),
        "{share} of {} reported",
        due.len()
    );
}
