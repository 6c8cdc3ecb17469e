//! The built-in payment simulator: a deterministic population of customers, cards and merchants
//! producing payment messages in each source's own JSON shape, with labelled fraud.
//!
//! Same seed, same bytes: all randomness comes from one ChaCha8 stream seeded by `simulator.seed`,
//! and simulated time advances by drawn inter-arrival gaps, never by the wall clock.
//!
//! Labels (`is_fraud`, `fraud_scenario`) travel inside the message for training and evaluation;
//! the shipped mapping SQL never selects them, so the scoring path never sees them.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{SimulatorConfig, SourceConfig};

/// Message shapes the simulator can produce (`sources[].simulator`).
pub const SHAPES: &[&str] = &["card"];

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// `simulator.start_time` is not RFC 3339.
    #[error("simulator.start_time {0:?} is not an RFC 3339 time")]
    StartTime(String),
    /// No configured source has a simulator shape.
    #[error("no [[sources]] entry has a `simulator` shape; set e.g. simulator = \"card\"")]
    NoShapes,
}

/// One generated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Index of the source (in the config's `sources`) it belongs to.
    pub source: usize,
    /// Partitioning key (the card token for card payments).
    pub key: Vec<u8>,
    /// The JSON message.
    pub value: Vec<u8>,
    /// Simulated event time, epoch milliseconds.
    pub event_time_ms: i64,
    /// Ground-truth label (also inside `value`).
    pub is_fraud: bool,
}

#[derive(Debug, Clone)]
struct Customer {
    home_lat: f64,
    home_lon: f64,
    country: &'static str,
    /// ln of the median amount in cents.
    amount_mu: f64,
    amount_sigma: f64,
    cards: Vec<u32>,
    /// Merchants this customer frequents.
    favourites: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Merchant {
    mcc: &'static str,
    country: &'static str,
    lat: f64,
    lon: f64,
    terminals: u8,
    ecommerce: bool,
}

/// Fraud scenarios the simulator plays out (more arrive with the full simulator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Bursts of tiny e-commerce charges on one card, minutes apart.
    CardTesting,
    /// Many high amounts at merchants new to the card.
    StolenCardSpree,
}

impl Scenario {
    /// Simulated time between two transactions of an episode.
    fn gap_ms(self, rng: &mut ChaCha8Rng) -> i64 {
        match self {
            Self::CardTesting => rng.random_range(30_000..300_000),
            Self::StolenCardSpree => rng.random_range(300_000..1_800_000),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::CardTesting => "card_testing",
            Self::StolenCardSpree => "stolen_card_spree",
        }
    }
}

/// An ongoing fraud episode: a card being abused for a few more transactions.
#[derive(Debug, Clone)]
struct Episode {
    scenario: Scenario,
    customer: u32,
    card: u32,
    remaining: u32,
    /// Simulated time of its next transaction.
    next_at_ms: i64,
}

const COUNTRIES: &[(&str, f64, f64)] = &[
    ("BR", -23.55, -46.63),
    ("BR", -22.91, -43.17),
    ("BR", -19.92, -43.94),
    ("AR", -34.60, -58.38),
    ("MX", 19.43, -99.13),
    ("US", 40.71, -74.01),
    ("PT", 38.72, -9.14),
];
const MCCS: &[(&str, f64, bool)] = &[
    ("5411", 0.25, false), // grocery
    ("5812", 0.15, false), // restaurants
    ("5541", 0.10, false), // fuel
    ("5311", 0.08, false), // department stores
    ("5912", 0.07, false), // pharmacies
    ("4121", 0.07, false), // taxis / ride hailing
    ("5732", 0.05, true),  // electronics (online)
    ("5999", 0.08, true),  // misc retail (online)
    ("4814", 0.05, true),  // telecom top-ups (online)
    ("7995", 0.02, true),  // gambling (online)
    ("5944", 0.03, false), // jewellery
    ("5651", 0.05, false), // clothing
];

/// The deterministic generator.
#[derive(Debug, Clone)]
pub struct Simulator {
    rng: ChaCha8Rng,
    seed: u64,
    customers: Vec<Customer>,
    merchants: Vec<Merchant>,
    card_owner: Vec<u32>,
    clock_ms: i64,
    /// Mean gap between two transactions in simulated milliseconds.
    mean_gap_ms: f64,
    fraud_rate: f64,
    seq: u64,
    episodes: Vec<Episode>,
    /// Source index per shape (`card`), when configured.
    card_source: Option<usize>,
}

impl Simulator {
    /// Build the population for a config. `simulated_tps` sets how fast simulated time runs: the
    /// mean number of transactions per simulated second.
    pub fn new(
        cfg: &SimulatorConfig,
        sources: &[SourceConfig],
        seed: u64,
        simulated_tps: f64,
    ) -> Result<Self, SimulatorError> {
        let start = chrono::DateTime::parse_from_rfc3339(&cfg.start_time)
            .map_err(|_| SimulatorError::StartTime(cfg.start_time.clone()))?
            .timestamp_millis();
        let card_source = sources.iter().position(|s| s.simulator == "card");
        if card_source.is_none() {
            return Err(SimulatorError::NoShapes);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let merchants: Vec<Merchant> = (0..cfg.merchants)
            .map(|_| {
                let (country, lat, lon) = if rng.random_bool(0.9) {
                    COUNTRIES[rng.random_range(0..3)]
                } else {
                    COUNTRIES[rng.random_range(0..COUNTRIES.len())]
                };
                let mcc = pick_weighted(&mut rng, MCCS);
                Merchant {
                    mcc: mcc.0,
                    country,
                    lat: lat + rng.random_range(-0.2..0.2),
                    lon: lon + rng.random_range(-0.2..0.2),
                    terminals: rng.random_range(1..=8),
                    ecommerce: mcc.2,
                }
            })
            .collect();
        let mut card_owner = Vec::new();
        let customers: Vec<Customer> = (0..cfg.customers as u32)
            .map(|c| {
                let (country, lat, lon) = COUNTRIES[rng.random_range(0..3)];
                let n_cards = if rng.random_bool(0.3) { 2 } else { 1 };
                let cards = (0..n_cards)
                    .map(|_| {
                        card_owner.push(c);
                        (card_owner.len() - 1) as u32
                    })
                    .collect();
                let favourites = (0..rng.random_range(3..12))
                    .map(|_| rng.random_range(0..merchants.len() as u32))
                    .collect();
                Customer {
                    home_lat: lat + rng.random_range(-0.3..0.3),
                    home_lon: lon + rng.random_range(-0.3..0.3),
                    country,
                    // Median amounts between ~R$15 and ~R$250 by income band.
                    amount_mu: rng.random_range(7.3..10.1),
                    amount_sigma: rng.random_range(0.6..1.1),
                    cards,
                    favourites,
                }
            })
            .collect();
        Ok(Self {
            rng,
            seed,
            customers,
            merchants,
            card_owner,
            clock_ms: start,
            mean_gap_ms: 1000.0 / simulated_tps.max(1e-3),
            fraud_rate: cfg.fraud_rate,
            seq: 0,
            episodes: Vec::new(),
            card_source,
        })
    }

    /// Current simulated time, epoch milliseconds.
    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    /// Generate the next message, writing its JSON into a fresh buffer.
    pub fn next_message(&mut self) -> Generated {
        let mut value = Vec::with_capacity(480);
        let (key, event_time_ms, is_fraud) = self.write_next(&mut value);
        Generated {
            source: self.card_source.expect("checked in new"),
            key,
            value,
            event_time_ms,
            is_fraud,
        }
    }

    fn write_next(&mut self, out: &mut Vec<u8>) -> (Vec<u8>, i64, bool) {
        // Daily rhythm: nights are quiet, evenings busy.
        let hour = ((self.clock_ms / 3_600_000) % 24) as usize;
        const RHYTHM: [f64; 24] = [
            0.25, 0.15, 0.1, 0.08, 0.08, 0.15, 0.4, 0.7, 1.0, 1.1, 1.2, 1.3, 1.5, 1.4, 1.2, 1.2,
            1.3, 1.5, 1.7, 1.8, 1.6, 1.2, 0.8, 0.5,
        ];
        let gap = -self.mean_gap_ms / RHYTHM[hour] * (1.0 - self.rng.random::<f64>()).ln();
        self.clock_ms += gap.round() as i64;
        self.seq += 1;

        // A fraud episode due at this simulated time plays its next transaction.
        if let Some(i) = self
            .episodes
            .iter()
            .position(|e| e.next_at_ms <= self.clock_ms)
        {
            let ep = self.episodes[i].clone();
            let gap = ep.scenario.gap_ms(&mut self.rng);
            let e = &mut self.episodes[i];
            e.remaining -= 1;
            e.next_at_ms = self.clock_ms + gap;
            if e.remaining == 0 {
                self.episodes.swap_remove(i);
            }
            return self.write_fraud(&ep, out);
        }
        // Episodes start so that their transactions make up `fraud_rate` of the traffic.
        const MEAN_EPISODE_LEN: f64 = 5.5;
        let start_p = self.fraud_rate / MEAN_EPISODE_LEN;
        if self.rng.random_bool(start_p.clamp(0.0, 1.0)) {
            let card = self.rng.random_range(0..self.card_owner.len() as u32);
            let scenario = if self.rng.random_bool(0.5) {
                Scenario::CardTesting
            } else {
                Scenario::StolenCardSpree
            };
            let remaining = match scenario {
                Scenario::CardTesting => self.rng.random_range(5..10),
                Scenario::StolenCardSpree => self.rng.random_range(3..6),
            };
            let ep = Episode {
                scenario,
                customer: self.card_owner[card as usize],
                card,
                remaining: remaining - 1,
                next_at_ms: self.clock_ms + scenario.gap_ms(&mut self.rng),
            };
            self.episodes.push(ep.clone());
            return self.write_fraud(&ep, out);
        }
        let c = self.rng.random_range(0..self.customers.len() as u32);
        let cust = &self.customers[c as usize];
        let card = cust.cards[self.rng.random_range(0..cust.cards.len())];
        let m = if self.rng.random_bool(0.8) {
            cust.favourites[self.rng.random_range(0..cust.favourites.len())]
        } else {
            self.rng.random_range(0..self.merchants.len() as u32)
        };
        let z: f64 = normal(&mut self.rng);
        let cents = (cust.amount_mu + cust.amount_sigma * z)
            .exp()
            .clamp(100.0, 5_000_000.0) as i64;
        let (lat, lon) = (cust.home_lat, cust.home_lon);
        self.write_card(out, c, card, m, cents, lat, lon, None)
    }

    fn write_fraud(&mut self, ep: &Episode, out: &mut Vec<u8>) -> (Vec<u8>, i64, bool) {
        let cust = self.customers[ep.customer as usize].clone();
        match ep.scenario {
            Scenario::CardTesting => {
                // Tiny online charges, minutes apart, at online merchants.
                let m = self.pick_merchant(|m| m.ecommerce);
                let cents = self.rng.random_range(50..300);
                self.write_card(
                    out,
                    ep.customer,
                    ep.card,
                    m,
                    cents,
                    cust.home_lat,
                    cust.home_lon,
                    Some(ep.scenario),
                )
            }
            Scenario::StolenCardSpree => {
                let m = self.pick_merchant(|m| matches!(m.mcc, "5732" | "5944" | "5311" | "5651"));
                let cents = self.rng.random_range(80_000..900_000);
                let mer = &self.merchants[m as usize];
                let (lat, lon) = (mer.lat, mer.lon);
                self.write_card(
                    out,
                    ep.customer,
                    ep.card,
                    m,
                    cents,
                    lat,
                    lon,
                    Some(ep.scenario),
                )
            }
        }
    }

    fn pick_merchant(&mut self, pred: impl Fn(&Merchant) -> bool) -> u32 {
        for _ in 0..64 {
            let m = self.rng.random_range(0..self.merchants.len() as u32);
            if pred(&self.merchants[m as usize]) {
                return m;
            }
        }
        self.rng.random_range(0..self.merchants.len() as u32)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_card(
        &mut self,
        out: &mut Vec<u8>,
        customer: u32,
        card: u32,
        merchant: u32,
        cents: i64,
        lat: f64,
        lon: f64,
        scenario: Option<Scenario>,
    ) -> (Vec<u8>, i64, bool) {
        let mer = &self.merchants[merchant as usize];
        let cust = &self.customers[customer as usize];
        let online = mer.ecommerce;
        let terminal = self.rng.random_range(0..mer.terminals);
        let entry_mode = if online {
            "ecommerce"
        } else if self.rng.random_bool(0.7) {
            "contactless"
        } else {
            "chip"
        };
        let three_ds = if online {
            if scenario.is_some() {
                "attempted"
            } else {
                "authenticated"
            }
        } else {
            "none"
        };
        let cvv = if online && scenario == Some(Scenario::CardTesting) && self.rng.random_bool(0.4)
        {
            "N"
        } else {
            "M"
        };
        let key = format!("tok_{card:08}").into_bytes();
        let _ = write!(
            out,
            "{{\"auth_id\":\"auth-{:x}-{:010}\",\"ts\":\"",
            self.seed, self.seq
        );
        write_rfc3339_ms(out, self.clock_ms);
        let _ = write!(
            out,
            "\",\"pan_token\":\"tok_{card:08}\",\"customer_ref\":\"cus_{customer:07}\",\"merchant_id\":\"mer_{merchant:06}\",\"terminal_id\":\"ter_{merchant:06}_{terminal}\",\"mcc\":\"{}\",\"amount\":\"{}.{:02}\",\"currency\":\"{}\",\"country\":\"{}\",\"entry_mode\":\"{entry_mode}\",\"cvv_result\":\"{cvv}\",\"three_ds\":\"{three_ds}\",\"lat\":{:.4},\"lon\":{:.4},\"is_fraud\":{},\"fraud_scenario\":",
            mer.mcc,
            cents / 100,
            cents % 100,
            currency_of(if online { cust.country } else { mer.country }),
            if online { cust.country } else { mer.country },
            if online { lat } else { mer.lat },
            if online { lon } else { mer.lon },
            scenario.is_some(),
        );
        match scenario {
            Some(s) => {
                let _ = write!(out, "\"{}\"}}", s.name());
            }
            None => out.extend_from_slice(b"null}"),
        }
        (key, self.clock_ms, scenario.is_some())
    }
}

fn currency_of(country: &str) -> &'static str {
    match country {
        "BR" => "BRL",
        "AR" => "ARS",
        "MX" => "MXN",
        "US" => "USD",
        _ => "EUR",
    }
}

fn pick_weighted<T: Copy>(rng: &mut ChaCha8Rng, items: &[(T, f64, bool)]) -> (T, f64, bool) {
    let total: f64 = items.iter().map(|i| i.1).sum();
    let mut x = rng.random::<f64>() * total;
    for it in items {
        if x < it.1 {
            return *it;
        }
        x -= it.1;
    }
    *items.last().expect("non-empty")
}

/// Standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Write epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (no allocation, no time zone lookup).
pub fn write_rfc3339_ms(out: &mut Vec<u8>, ms: i64) {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<SourceConfig> {
        let text = include_str!("../../config.toml");
        toml::from_str::<crate::config::Config>(text)
            .unwrap()
            .sources
    }

    #[test]
    fn same_seed_same_bytes_and_valid_json() {
        let cfg = SimulatorConfig::default();
        let mut a = Simulator::new(&cfg, &sources(), 7, 100.0).unwrap();
        let mut b = Simulator::new(&cfg, &sources(), 7, 100.0).unwrap();
        let mut c = Simulator::new(&cfg, &sources(), 8, 100.0).unwrap();
        let mut differs = false;
        let mut last = 0;
        for _ in 0..2000 {
            let (x, y, z) = (a.next_message(), b.next_message(), c.next_message());
            assert_eq!(x, y);
            differs |= x.value != z.value;
            let v: serde_json::Value = serde_json::from_slice(&x.value).unwrap();
            assert!(v["amount"].as_str().unwrap().contains('.'));
            assert!(x.event_time_ms >= last);
            last = x.event_time_ms;
        }
        assert!(differs);
    }

    #[test]
    fn timestamps_format_like_chrono() {
        for ms in [0_i64, 1_767_225_600_123, 951_782_400_000, 4_102_444_799_999] {
            let mut out = Vec::new();
            write_rfc3339_ms(&mut out, ms);
            let expect = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expect);
        }
    }
}
