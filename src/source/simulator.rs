//! The built-in payment simulator: a deterministic population of customers, cards, accounts,
//! devices and merchants producing payment messages in each source's own JSON shape (card
//! authorisations, PIX, digital wallet, bank transfers and boletos), with labelled fraud scenarios
//! and an optional delayed label-feedback stream (chargebacks and fraud reports).
//!
//! Same seed, same bytes: the population and every message come from one ChaCha8 stream seeded by
//! `seed`, and simulated time advances by drawn inter-arrival gaps, never by the wall clock. Label
//! feedback draws from a second stream of its own, so switching it on does not change a byte of
//! the transactions.
//!
//! Labels (`is_fraud`, `fraud_scenario`) travel inside every message for training and evaluation;
//! no source declares them as a field and no shipped mapping SQL selects them, so the scoring
//! path never sees them.
//!
//! Hot path: [`Simulator::next_into`] appends one message to a caller's buffer, with hand-written
//! number and time formatting and no allocation (the skimming and mule episodes allocate one small
//! vector each when they start).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{SimulatorConfig, SourceConfig};

/// Message shapes the simulator can produce (`sources[].simulator`).
pub const SHAPES: &[&str] = &["card", "pix", "wallet", "transfer"];

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// `simulator.start_time` is not RFC 3339.
    #[error("simulator.start_time {0:?} is not an RFC 3339 time")]
    StartTime(String),
    /// No configured source has a simulator shape.
    #[error("no [[sources]] entry has a `simulator` shape; set e.g. simulator = \"card\"")]
    NoShapes,
    /// The population is empty.
    #[error("simulator.customers and simulator.merchants must be at least 1")]
    EmptyPopulation,
}

/// A message shape: the JSON one kind of payment source sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// Card authorisations, acquirer style (key: `pan_token`).
    Card,
    /// PIX instant payments (key: `payer_key`).
    Pix,
    /// Digital wallet payments (key: `wallet_id`).
    Wallet,
    /// Bank transfers (TED, internal) and boleto payments (key: the debtor account).
    Transfer,
}

impl Shape {
    /// Every shape, in [`SHAPES`] order.
    pub const ALL: [Shape; 4] = [Shape::Card, Shape::Pix, Shape::Wallet, Shape::Transfer];

    /// The name used in `sources[].simulator`.
    pub fn name(self) -> &'static str {
        SHAPES[self as usize]
    }

    /// The shape called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// How the label feedback of this shape is called in the industry.
    fn report_type(self) -> &'static str {
        match self {
            Shape::Card | Shape::Wallet => "chargeback",
            // PIX: the central bank's Special Return Mechanism (Mecanismo Especial de Devolução).
            Shape::Pix => "med",
            Shape::Transfer => "fraud_claim",
        }
    }
}

/// Fraud scenarios the simulator plays out; each labels its messages with [`Scenario::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Bursts of tiny e-commerce charges on one card, minutes apart, many declined.
    CardTesting,
    /// Many high amounts at high-value merchants the card never used.
    StolenCardSpree,
    /// A new device and a foreign IP, a small probe, then large transfers to new payees.
    AccountTakeover,
    /// Skimming: cards used at one terminal are cloned and cashed out elsewhere days later.
    CompromisedTerminal,
    /// A cloned card present far away minutes after the genuine card was used at home.
    ImpossibleTravel,
    /// A mule account receiving many PIX transfers from distinct payers, then forwarding them.
    MuleAccount,
}

impl Scenario {
    /// Every scenario, in the order of [`SimulatorParams::scenario_shares`].
    pub const ALL: [Scenario; 6] = [
        Scenario::CardTesting,
        Scenario::StolenCardSpree,
        Scenario::AccountTakeover,
        Scenario::CompromisedTerminal,
        Scenario::ImpossibleTravel,
        Scenario::MuleAccount,
    ];

    /// The label written to `fraud_scenario`.
    pub fn name(self) -> &'static str {
        match self {
            Self::CardTesting => "card_testing",
            Self::StolenCardSpree => "stolen_card_spree",
            Self::AccountTakeover => "account_takeover",
            Self::CompromisedTerminal => "compromised_terminal",
            Self::ImpossibleTravel => "impossible_travel",
            Self::MuleAccount => "mule_account",
        }
    }

    /// The scenario labelled `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Expected (fraudulent messages, all messages) of one episode; must follow the step counts
    /// drawn in [`Simulator::start_episode`].
    fn expected_len(self) -> (f64, f64) {
        match self {
            // 5..=12 charges.
            Self::CardTesting => (8.5, 8.5),
            // 3..=7 purchases.
            Self::StolenCardSpree => (5.0, 5.0),
            // A probe and 1..=3 large transfers.
            Self::AccountTakeover => (3.0, 3.0),
            // 6..=12 genuine payments harvested, then about as many cash-outs (plus a few repeats).
            Self::CompromisedTerminal => (10.6, 19.6),
            // A genuine payment, then 1..=3 cloned-card payments far away.
            Self::ImpossibleTravel => (2.0, 3.0),
            // 8..=20 incoming PIX and 1..=2 outgoing.
            Self::MuleAccount => (15.5, 15.5),
        }
    }

    /// Shapes of which at least one must be configured for the scenario to run.
    fn needs(self) -> &'static [Shape] {
        match self {
            Self::CardTesting
            | Self::StolenCardSpree
            | Self::CompromisedTerminal
            | Self::ImpossibleTravel => &[Shape::Card],
            Self::AccountTakeover => &[Shape::Pix, Shape::Transfer, Shape::Wallet],
            Self::MuleAccount => &[Shape::Pix],
        }
    }
}

/// Tunables of the simulator beyond `[simulator]` in the config (defaults: [`Default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatorParams {
    /// Keep label feedback (chargebacks, fraud reports) for fraudulent transactions, read with
    /// [`Simulator::next_label_into`]. Off by default: nothing is kept that nobody reads.
    pub label_feedback: bool,
    /// Shortest delay, in simulated days, between a fraudulent transaction and its report.
    pub label_delay_min_days: f64,
    /// Longest delay, in simulated days (delays lean towards the short end).
    pub label_delay_max_days: f64,
    /// Share of fraudulent transactions that are ever reported (0 ..= 1).
    pub label_report_share: f64,
    /// Share of the fraudulent transactions per scenario, in [`Scenario::ALL`] order (relative
    /// weights; 0 switches a scenario off). A scenario whose shapes are not configured is off.
    pub scenario_shares: [f64; 6],
    /// Skimming: simulated days from the last card harvested at a compromised terminal to the
    /// first cash-out, as (min, max).
    pub skim_cashout_delay_days: (f64, f64),
    /// Mean payments per customer per simulated day; sets the population's own rate
    /// ([`Simulator::natural_tps`]).
    pub mean_tx_per_day: f64,
}

impl Default for SimulatorParams {
    fn default() -> Self {
        Self {
            label_feedback: false,
            label_delay_min_days: 3.0,
            label_delay_max_days: 45.0,
            label_report_share: 0.9,
            scenario_shares: [0.28, 0.18, 0.12, 0.14, 0.08, 0.20],
            skim_cashout_delay_days: (0.5, 3.0),
            mean_tx_per_day: 3.0,
        }
    }
}

/// A short byte string kept inline (message keys, transaction ids): no allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key {
    len: u8,
    bytes: [u8; 47],
}

impl Key {
    fn from_slice(s: &[u8]) -> Self {
        let mut k = Key {
            len: s.len().min(47) as u8,
            bytes: [0; 47],
        };
        k.bytes[..k.len as usize].copy_from_slice(&s[..k.len as usize]);
        k
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// What [`Simulator::next_into`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Index of the source (in the config's `sources`) the message belongs to.
    pub source: usize,
    /// Its shape.
    pub shape: Shape,
    /// Partitioning key: the entity that must stay on one partition.
    pub key: Key,
    /// Simulated event time, epoch milliseconds.
    pub event_time_ms: i64,
    /// Ground-truth label (also inside the message).
    pub is_fraud: bool,
    /// The fraud scenario, when fraudulent.
    pub scenario: Option<Scenario>,
}

/// What [`Simulator::next_label_into`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelMeta {
    /// Index of the source of the reported transaction.
    pub source: usize,
    /// The reported transaction's id (also the message key).
    pub transaction_id: Key,
    /// When the report arrives (simulated), epoch milliseconds.
    pub reported_at_ms: i64,
    /// When the transaction happened, epoch milliseconds.
    pub transaction_time_ms: i64,
}

/// One generated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Index of the source (in the config's `sources`) it belongs to.
    pub source: usize,
    /// Partitioning key (card token, payer key, wallet id or debtor account).
    pub key: Vec<u8>,
    /// The JSON message.
    pub value: Vec<u8>,
    /// Simulated event time, epoch milliseconds.
    pub event_time_ms: i64,
    /// Ground-truth label (also inside `value`).
    pub is_fraud: bool,
    /// The fraud scenario, when fraudulent (also inside `value`).
    pub scenario: Option<Scenario>,
}

// ---------------------------------------------------------------------------------------------
// Reference data
// ---------------------------------------------------------------------------------------------

struct Country {
    code: &'static str,
    currency: &'static str,
    /// Units of the currency per BRL.
    fx: f64,
    /// First octets of this country's addresses in the simulator's own GeoIP table.
    ip_prefixes: &'static [u8],
}

const BR: u8 = 0;
#[rustfmt::skip]
const COUNTRIES: &[Country] = &[
    Country { code: "BR", currency: "BRL", fx: 1.0, ip_prefixes: &[177, 179, 186, 187, 189, 191, 200, 201] },
    Country { code: "AR", currency: "ARS", fx: 190.0, ip_prefixes: &[181, 190] },
    Country { code: "MX", currency: "MXN", fx: 3.4, ip_prefixes: &[132, 148] },
    Country { code: "US", currency: "USD", fx: 0.18, ip_prefixes: &[23, 50, 64, 98] },
    Country { code: "PT", currency: "EUR", fx: 0.17, ip_prefixes: &[85, 94] },
    Country { code: "ES", currency: "EUR", fx: 0.17, ip_prefixes: &[83, 88] },
    // Where fraudsters' proxies and hosting sit; no simulated customer lives there.
    Country { code: "NL", currency: "EUR", fx: 0.17, ip_prefixes: &[185] },
    Country { code: "RU", currency: "RUB", fx: 16.0, ip_prefixes: &[95] },
    Country { code: "NG", currency: "NGN", fx: 280.0, ip_prefixes: &[105] },
    Country { code: "VN", currency: "VND", fx: 4500.0, ip_prefixes: &[113] },
    Country { code: "UA", currency: "UAH", fx: 7.5, ip_prefixes: &[176] },
];
/// Countries whose addresses fraudsters use (indexes into [`COUNTRIES`]).
const FRAUD_IP_COUNTRIES: &[u8] = &[3, 6, 7, 8, 9, 10];

/// The country of an IP address in the simulator's GeoIP table (`None`: not one it hands out).
pub fn ip_country(ip: &str) -> Option<&'static str> {
    let first: u8 = ip.split('.').next()?.parse().ok()?;
    COUNTRIES
        .iter()
        .find(|c| c.ip_prefixes.contains(&first))
        .map(|c| c.code)
}

struct City {
    country: u8,
    lat: f64,
    lon: f64,
    /// Share of the customers living there (0: only merchants and travellers).
    home_weight: f64,
    /// Phone area code (Brazilian cities).
    ddd: u8,
}

#[rustfmt::skip]
const CITIES: &[City] = &[
    City { country: BR, lat: -23.55, lon: -46.63, home_weight: 0.34, ddd: 11 }, // São Paulo
    City { country: BR, lat: -22.91, lon: -43.17, home_weight: 0.18, ddd: 21 }, // Rio de Janeiro
    City { country: BR, lat: -19.92, lon: -43.94, home_weight: 0.09, ddd: 31 }, // Belo Horizonte
    City { country: BR, lat: -15.79, lon: -47.88, home_weight: 0.08, ddd: 61 }, // Brasília
    City { country: BR, lat: -12.97, lon: -38.50, home_weight: 0.07, ddd: 71 }, // Salvador
    City { country: BR, lat: -8.05, lon: -34.88, home_weight: 0.07, ddd: 81 },  // Recife
    City { country: BR, lat: -30.03, lon: -51.23, home_weight: 0.08, ddd: 51 }, // Porto Alegre
    City { country: BR, lat: -25.43, lon: -49.27, home_weight: 0.09, ddd: 41 }, // Curitiba
    City { country: 1, lat: -34.60, lon: -58.38, home_weight: 0.0, ddd: 0 },    // Buenos Aires
    City { country: 2, lat: 19.43, lon: -99.13, home_weight: 0.0, ddd: 0 },     // Mexico City
    City { country: 3, lat: 40.71, lon: -74.01, home_weight: 0.0, ddd: 0 },     // New York
    City { country: 3, lat: 25.76, lon: -80.19, home_weight: 0.0, ddd: 0 },     // Miami
    City { country: 4, lat: 38.72, lon: -9.14, home_weight: 0.0, ddd: 0 },      // Lisbon
    City { country: 5, lat: 40.42, lon: -3.70, home_weight: 0.0, ddd: 0 },      // Madrid
];
/// Cities at least this far apart are "distant" (impossible travel within minutes).
const FAR_KM: f64 = 800.0;

/// Merchant categories: code, share of merchants, share of them online, amount factor, class.
struct Mcc {
    code: &'static str,
    weight: f64,
    online: f64,
    amount: f64,
    class: MccClass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MccClass {
    /// Everyday spending: where customers also try new merchants.
    Everyday,
    /// Expensive goods: only at favourites for genuine customers; stolen-card sprees go there.
    HighValue,
    /// Cheap digital goods: card testers' favourite targets (also everyday).
    Digital,
    /// Cash machines.
    Atm,
    /// Utilities and billers (boletos).
    Biller,
    /// Anything else.
    Other,
}

const MCC_ATM: u8 = 16;
#[rustfmt::skip]
const MCCS: &[Mcc] = &[
    Mcc { code: "5411", weight: 0.20, online: 0.05, amount: 1.0, class: MccClass::Everyday },   // grocery
    Mcc { code: "5812", weight: 0.13, online: 0.10, amount: 0.8, class: MccClass::Everyday },   // restaurants
    Mcc { code: "5814", weight: 0.06, online: 0.15, amount: 0.4, class: MccClass::Everyday },   // fast food
    Mcc { code: "5541", weight: 0.07, online: 0.0, amount: 1.6, class: MccClass::Everyday },    // fuel
    Mcc { code: "5912", weight: 0.07, online: 0.10, amount: 0.7, class: MccClass::Everyday },   // pharmacies
    Mcc { code: "4121", weight: 0.05, online: 1.0, amount: 0.5, class: MccClass::Everyday },    // ride hailing
    Mcc { code: "5651", weight: 0.06, online: 0.30, amount: 1.5, class: MccClass::Everyday },   // clothing
    Mcc { code: "5999", weight: 0.07, online: 0.55, amount: 1.0, class: MccClass::Digital },    // misc retail
    Mcc { code: "4814", weight: 0.03, online: 1.0, amount: 0.5, class: MccClass::Digital },     // telecom top-ups
    Mcc { code: "5816", weight: 0.03, online: 1.0, amount: 0.3, class: MccClass::Digital },     // digital goods
    Mcc { code: "5311", weight: 0.04, online: 0.30, amount: 2.0, class: MccClass::HighValue },  // department stores
    Mcc { code: "5732", weight: 0.04, online: 0.60, amount: 5.0, class: MccClass::HighValue },  // electronics
    Mcc { code: "5944", weight: 0.015, online: 0.20, amount: 8.0, class: MccClass::HighValue }, // jewellery
    Mcc { code: "4511", weight: 0.015, online: 1.0, amount: 10.0, class: MccClass::HighValue }, // airlines
    Mcc { code: "7995", weight: 0.01, online: 1.0, amount: 1.5, class: MccClass::Other },       // gambling
    Mcc { code: "4900", weight: 0.03, online: 1.0, amount: 3.0, class: MccClass::Biller },      // utilities
    Mcc { code: "6011", weight: 0.03, online: 0.0, amount: 3.0, class: MccClass::Atm },         // ATMs
];

/// Banks: ISPB (the central bank's participant id) of some Brazilian institutions.
const BANKS: &[&str] = &[
    "60701190", "60746948", "00000000", "00360305", "90400888", "18236120", "00416968", "31872495",
    "10573521", "22896431",
];
const WALLET_PROVIDERS: &[&str] = &[
    "apple_pay",
    "google_pay",
    "samsung_pay",
    "mercado_pago",
    "picpay",
];
const EMAIL_DOMAINS: &[&str] = &[
    "gmail.com",
    "hotmail.com",
    "outlook.com",
    "yahoo.com.br",
    "uol.com.br",
];

/// Hourly activity, local time, Monday to Friday and at weekends; daily factors Monday..Sunday.
const WEEKDAY_HOURS: [f64; 24] = [
    0.20, 0.12, 0.08, 0.06, 0.06, 0.12, 0.35, 0.70, 1.00, 1.15, 1.25, 1.35, 1.55, 1.45, 1.25, 1.20,
    1.25, 1.40, 1.60, 1.70, 1.55, 1.20, 0.80, 0.45,
];
const WEEKEND_HOURS: [f64; 24] = [
    0.35, 0.25, 0.15, 0.10, 0.07, 0.08, 0.15, 0.30, 0.55, 0.85, 1.10, 1.30, 1.50, 1.50, 1.40, 1.30,
    1.25, 1.30, 1.45, 1.60, 1.55, 1.35, 1.00, 0.60,
];
const DAY_FACTORS: [f64; 7] = [0.95, 0.95, 1.0, 1.02, 1.15, 1.10, 0.85];
/// The simulated market's local time: UTC-3 (Brasília).
const LOCAL_OFFSET_MS: i64 = -3 * 3_600_000;

/// Account numbers: customers' accounts first, then merchants', then mules'.
const MERCHANT_ACCOUNT_BASE: u64 = 60_000_000;
const MULE_ACCOUNT_BASE: u64 = 90_000_000;

const MAX_FAV: usize = 11;
const MAX_CONTACTS: usize = 6;
/// Chance per genuine payment that a customer at home plans a trip.
const TRIP_START_P: f64 = 1.0 / 250.0;
/// Chance that a genuine amount comes from the heavy (Pareto) tail.
const TAIL_P: f64 = 0.02;
/// Episode starts are steered so the emitted fraud share tracks `fraud_rate`: a deficit of this
/// many mean episodes doubles the start rate.
const STEER_EPISODES: f64 = 20.0;

/// Customers drawn ahead (see `Simulator::pick_customer`).
const AHEAD: usize = 8;

const MIN_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

// ---------------------------------------------------------------------------------------------
// Population
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct Trip {
    depart_ms: i64,
    arrive_ms: i64,
    leave_ms: i64,
    back_ms: i64,
    city: u8,
}

/// A customer: three cache lines, laid out so that a genuine payment mostly reads the first two
/// (see `Simulator::pick_customer`).
#[derive(Debug, Clone)]
#[repr(C, align(64))]
struct Customer {
    // Line 0: where the customer is and how they pay.
    trip: Trip,
    /// Cumulative channel preferences over [`Shape::ALL`] (configured shapes only).
    channel_cdf: [f32; 4],
    /// ln of the median everyday amount in cents, and its spread.
    amount_mu: f32,
    amount_sigma: f32,
    // Line 1: their cards, accounts and favourite merchants.
    first_card: u32,
    first_account: u32,
    city: u8,
    band: u8,
    n_cards: u8,
    n_accounts: u8,
    n_devices: u8,
    /// Favourites `[..n_fav_physical]` are shops in the home city, the rest online.
    n_fav: u8,
    n_fav_physical: u8,
    n_contacts: u8,
    has_wallet: bool,
    wallet_provider: u8,
    favourites: [u32; MAX_FAV],
    // Line 2: the people they pay.
    contacts: [u32; MAX_CONTACTS],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whereabouts {
    City(u8),
    InTransit,
}

impl Customer {
    fn whereabouts(&self, now: i64) -> Whereabouts {
        let t = &self.trip;
        if now < t.depart_ms || now >= t.back_ms {
            Whereabouts::City(self.city)
        } else if now >= t.arrive_ms && now < t.leave_ms {
            Whereabouts::City(t.city)
        } else {
            Whereabouts::InTransit
        }
    }
}

#[derive(Debug, Clone)]
struct Merchant {
    mcc: u8,
    city: u8,
    terminals: u8,
    online: bool,
    lat: f32,
    lon: f32,
}

/// Merchant lists the generator picks from.
#[derive(Debug, Clone, Default)]
struct MerchantIndex {
    physical_by_city: Vec<Vec<u32>>,
    everyday_physical_by_city: Vec<Vec<u32>>,
    high_value_physical_by_city: Vec<Vec<u32>>,
    atms_by_city: Vec<Vec<u32>>,
    /// Indexed `[mcc][city]`.
    physical_by_mcc_city: Vec<Vec<Vec<u32>>>,
    online_by_mcc: Vec<Vec<u32>>,
    everyday_online: Vec<u32>,
    high_value_online_br: Vec<u32>,
    testing_targets: Vec<u32>,
    skim_spots: Vec<u32>,
    billers: Vec<u32>,
    all: Vec<u32>,
}

/// A party of a PIX or a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Party {
    /// A customer's account.
    Customer { c: u32, account: u32 },
    /// A merchant's account.
    Merchant(u32),
    /// A mule's account.
    Mule(u32),
}

// ---------------------------------------------------------------------------------------------
// Episodes and labels
// ---------------------------------------------------------------------------------------------

/// An ongoing fraud episode.
#[derive(Debug, Clone)]
struct Episode {
    scenario: Scenario,
    /// Next step to play, and the number of steps.
    step: u32,
    steps: u32,
    /// Harvest steps (skimming), incoming transfers (mules).
    split: u32,
    customer: u32,
    card: u32,
    merchant: u32,
    terminal: u8,
    city: u8,
    shape: Shape,
    device: u64,
    ip: u32,
    /// Mule index.
    mule: u32,
    /// Mules: amount collected so far (cents).
    collected: i64,
    /// Harvested cards (skimming), payers used (mules).
    list: Vec<u32>,
}

impl Episode {
    fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            step: 0,
            steps: 1,
            split: 0,
            customer: 0,
            card: 0,
            merchant: 0,
            terminal: 0,
            city: 0,
            shape: Shape::Card,
            device: 0,
            ip: 0,
            mule: 0,
            collected: 0,
            list: Vec::new(),
        }
    }
}

/// An episode's next step in time (min-heap by time, then by insertion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Due {
    at_ms: i64,
    order: u64,
    slot: u32,
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_ms, other.order).cmp(&(self.at_ms, self.order))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A label report waiting for its time (min-heap by report time, then by insertion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingLabel {
    due_ms: i64,
    order: u64,
    tx_ms: i64,
    source: u16,
    shape: Shape,
    scenario: Scenario,
    id: Key,
}

impl Ord for PendingLabel {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due_ms, other.order).cmp(&(self.due_ms, self.order))
    }
}

impl PartialOrd for PendingLabel {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

// ---------------------------------------------------------------------------------------------
// Messages (before they are written)
// ---------------------------------------------------------------------------------------------

struct CardMsg {
    customer: u32,
    card: u32,
    merchant: u32,
    terminal: u8,
    /// In BRL; converted to the merchant's currency when written.
    cents_brl: i64,
    entry: &'static str,
    cvv: &'static str,
    three_ds: &'static str,
    response: &'static str,
    device: u64,
    ip: u32,
    scenario: Option<Scenario>,
}

struct PixMsg {
    payer: Party,
    payee: Party,
    cents: i64,
    initiation: &'static str,
    device: u64,
    ip: u32,
    scenario: Option<Scenario>,
}

#[derive(Clone, Copy)]
enum WalletUse {
    Nfc(u32),
    InApp(u32),
    /// Counterparty wallet index (customers, then mules).
    P2p(u32),
}

struct WalletMsg {
    customer: u32,
    what: WalletUse,
    card: Option<u32>,
    cents_brl: i64,
    device: u64,
    ip: u32,
    scenario: Option<Scenario>,
}

struct TransferMsg {
    customer: u32,
    account: u32,
    creditor: Party,
    kind: &'static str,
    cents: i64,
    channel: &'static str,
    device: u64,
    ip: u32,
    scenario: Option<Scenario>,
}

// ---------------------------------------------------------------------------------------------
// The simulator
// ---------------------------------------------------------------------------------------------

/// The deterministic generator.
#[derive(Debug, Clone)]
pub struct Simulator {
    rng: ChaCha8Rng,
    label_rng: ChaCha8Rng,
    params: SimulatorParams,
    salt: u64,
    /// `seed` in hex, inside transaction ids (two runs with different seeds do not collide).
    seed_hex: Key,
    customers: Vec<Customer>,
    alias_prob: Vec<f32>,
    alias_idx: Vec<u32>,
    card_owner: Vec<u32>,
    merchants: Vec<Merchant>,
    index: MerchantIndex,
    n_mules: u32,
    /// Customers by home city.
    city_customers: Vec<Vec<u32>>,
    /// Cities at least [`FAR_KM`] away, per city.
    far_cities: Vec<Vec<u8>>,
    /// Activity per hour of the (local) week, mean 1.
    rhythm: [f64; 168],
    /// Fraud is flatter over the day than genuine traffic: episode start factor per week hour.
    fraud_factor: [f64; 168],
    source_of: [Option<usize>; 4],
    source_names: Vec<String>,
    clock_ms: i64,
    mean_gap_ms: f64,
    natural_tps: f64,
    fraud_rate: f64,
    /// Base chance per free message slot that an episode starts.
    start_q: f64,
    /// Cumulative start chances of the scenarios.
    scenario_cdf: [f64; 6],
    steer_scale: f64,
    seq: u64,
    emitted: u64,
    fraud_emitted: u64,
    episodes: Vec<Episode>,
    free_slots: Vec<u32>,
    due: BinaryHeap<Due>,
    order: u64,
    labels: BinaryHeap<PendingLabel>,
    spare_normal: Option<f64>,
    hour: HourCache,
    upcoming: [u32; AHEAD],
    upcoming_len: usize,
}

impl Simulator {
    /// Build the population for a config. `simulated_tps` sets how fast simulated time runs: the
    /// mean number of transactions per simulated second (0 or less: the population's own rate,
    /// [`Simulator::natural_tps`]).
    pub fn new(
        cfg: &SimulatorConfig,
        sources: &[SourceConfig],
        seed: u64,
        simulated_tps: f64,
    ) -> Result<Self, SimulatorError> {
        Self::with_params(
            cfg,
            sources,
            seed,
            simulated_tps,
            SimulatorParams::default(),
        )
    }

    /// [`Simulator::new`] with explicit tunables.
    pub fn with_params(
        cfg: &SimulatorConfig,
        sources: &[SourceConfig],
        seed: u64,
        simulated_tps: f64,
        params: SimulatorParams,
    ) -> Result<Self, SimulatorError> {
        let start = chrono::DateTime::parse_from_rfc3339(&cfg.start_time)
            .map_err(|_| SimulatorError::StartTime(cfg.start_time.clone()))?
            .timestamp_millis();
        let mut source_of = [None; 4];
        for (i, s) in sources.iter().enumerate() {
            if let Some(shape) = Shape::from_name(&s.simulator) {
                source_of[shape as usize].get_or_insert(i);
            }
        }
        if source_of.iter().all(Option::is_none) {
            return Err(SimulatorError::NoShapes);
        }
        if cfg.customers == 0 || cfg.merchants == 0 {
            return Err(SimulatorError::EmptyPopulation);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let salt = rng.next_u64();
        let label_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6c61_6265_6c73_2121);
        let mut seed_hex = Vec::new();
        put_hex_trimmed(&mut seed_hex, seed);

        let mut b = Builder { rng: &mut rng };
        let merchants = b.merchants(cfg.merchants);
        let index = MerchantIndex::build(&merchants);
        let configured = source_of.map(|s| s.is_some());
        let (customers, card_owner, weights) =
            b.customers(cfg.customers, &merchants, &index, configured, &params);
        let (alias_prob, alias_idx) = alias_table(&weights);
        let natural_tps = weights.iter().sum::<f64>() / 86_400.0;
        let tps = if simulated_tps > 0.0 && simulated_tps.is_finite() {
            simulated_tps
        } else {
            natural_tps
        };

        let mut city_customers = vec![Vec::new(); CITIES.len()];
        for (i, c) in customers.iter().enumerate() {
            city_customers[c.city as usize].push(i as u32);
        }
        let far_cities = (0..CITIES.len())
            .map(|a| {
                (0..CITIES.len())
                    .filter(|&b| city_km(a as u8, b as u8) >= FAR_KM)
                    .map(|b| b as u8)
                    .collect()
            })
            .collect();

        let mut rhythm = [0.0; 168];
        for (h, r) in rhythm.iter_mut().enumerate() {
            let (day, hour) = (h / 24, h % 24);
            let table = if day >= 5 {
                &WEEKEND_HOURS
            } else {
                &WEEKDAY_HOURS
            };
            *r = table[hour] * DAY_FACTORS[day];
        }
        let mean = rhythm.iter().sum::<f64>() / 168.0;
        let mut fraud_factor = [0.0; 168];
        for (r, f) in rhythm.iter_mut().zip(fraud_factor.iter_mut()) {
            *r /= mean;
            // Fraud follows the day only half as much as people do: relatively more at night.
            *f = (0.5 * *r + 0.5) / *r;
        }

        // Scenarios: starts weighted so that each gets its share of fraudulent transactions.
        let mut weights = [0.0; 6];
        for (i, s) in Scenario::ALL.iter().enumerate() {
            let possible = s.needs().iter().any(|sh| configured[*sh as usize]);
            let share = params.scenario_shares[i].max(0.0);
            if possible && share > 0.0 {
                weights[i] = share / s.expected_len().0;
            }
        }
        let total: f64 = weights.iter().sum();
        let mut scenario_cdf = [0.0; 6];
        let (mut fraud_len, mut slots, mut acc) = (0.0, 0.0, 0.0);
        for (i, s) in Scenario::ALL.iter().enumerate() {
            let p = if total > 0.0 { weights[i] / total } else { 0.0 };
            acc += p;
            scenario_cdf[i] = acc;
            fraud_len += p * s.expected_len().0;
            slots += p * s.expected_len().1;
        }
        let f = cfg.fraud_rate.clamp(0.0, 0.9);
        // Starts happen in slots no episode is using: q (L - f (T - 1)) = f.
        let start_q = if total > 0.0 && f > 0.0 {
            (f / (fraud_len - f * (slots - 1.0)).max(1e-9)).min(1.0)
        } else {
            0.0
        };

        Ok(Self {
            rng,
            label_rng,
            params,
            salt,
            seed_hex: Key::from_slice(&seed_hex),
            n_mules: (cfg.customers as u32 / 200).max(50),
            customers,
            alias_prob,
            alias_idx,
            card_owner,
            merchants,
            index,
            city_customers,
            far_cities,
            rhythm,
            fraud_factor,
            source_of,
            source_names: sources.iter().map(|s| s.name.clone()).collect(),
            clock_ms: start,
            mean_gap_ms: 1000.0 / tps,
            natural_tps,
            fraud_rate: f,
            start_q,
            scenario_cdf,
            steer_scale: STEER_EPISODES * fraud_len.max(1.0),
            seq: 0,
            emitted: 0,
            fraud_emitted: 0,
            episodes: Vec::new(),
            free_slots: Vec::new(),
            due: BinaryHeap::new(),
            order: 0,
            labels: BinaryHeap::new(),
            spare_normal: None,
            hour: HourCache::new(),
            upcoming: [0; AHEAD],
            upcoming_len: 0,
        })
    }

    /// Current simulated time, epoch milliseconds.
    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    /// The population's own rate: its customers' payments per day over 86,400 seconds.
    pub fn natural_tps(&self) -> f64 {
        self.natural_tps
    }

    /// Mean transactions per simulated second this simulator runs at.
    pub fn simulated_tps(&self) -> f64 {
        1000.0 / self.mean_gap_ms
    }

    /// Change how fast simulated time runs from now on (mean transactions per simulated second;
    /// 0 or less: [`Simulator::natural_tps`]).
    pub fn set_simulated_tps(&mut self, tps: f64) {
        let tps = if tps > 0.0 && tps.is_finite() {
            tps
        } else {
            self.natural_tps
        };
        self.mean_gap_ms = 1000.0 / tps;
    }

    /// The tunables in use.
    pub fn params(&self) -> &SimulatorParams {
        &self.params
    }

    /// Label reports kept, not yet due.
    pub fn pending_labels(&self) -> usize {
        self.labels.len()
    }

    /// Generate the next message into a fresh buffer.
    pub fn next_message(&mut self) -> Generated {
        let mut value = Vec::with_capacity(512);
        let m = self.next_into(&mut value);
        Generated {
            source: m.source,
            key: m.key.as_bytes().to_vec(),
            value,
            event_time_ms: m.event_time_ms,
            is_fraud: m.is_fraud,
            scenario: m.scenario,
        }
    }

    /// Generate the next message, appending its JSON (no newline) to `out`.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Meta {
        let hour = self.week_hour();
        let u = self.unit();
        self.clock_ms += (-self.mean_gap_ms / self.rhythm[hour] * (1.0 - u).ln()).round() as i64;
        self.seq += 1;
        self.hour.refresh(self.clock_ms);
        let start = out.len();
        let meta = if let Some(d) = self
            .due
            .peek()
            .copied()
            .filter(|d| d.at_ms <= self.clock_ms)
        {
            self.due.pop();
            self.play(d.slot, out)
        } else if self.should_start(hour) {
            self.start_episode(out)
        } else {
            self.genuine(out)
        };
        self.emitted += 1;
        if let Some(s) = meta.scenario {
            self.fraud_emitted += 1;
            if self.params.label_feedback {
                self.keep_label(&out[start..], meta, s);
            }
        }
        meta
    }

    /// If a label report is due by the simulated clock, append it (JSON, no newline) to `out`.
    ///
    /// Reports: `{"transaction_id","source","label":"fraud","report_type","fraud_scenario",
    /// "transaction_time","reported_at"}`; only with [`SimulatorParams::label_feedback`].
    pub fn next_label_into(&mut self, out: &mut Vec<u8>) -> Option<LabelMeta> {
        if self.labels.peek()?.due_ms > self.clock_ms {
            return None;
        }
        let l = self.labels.pop()?;
        let source = l.source as usize;
        out.s("{\"transaction_id\":\"");
        out.b(l.id.as_bytes());
        out.s("\",\"source\":\"");
        out.s(&self.source_names[source]);
        out.s("\",\"label\":\"fraud\",\"report_type\":\"");
        out.s(l.shape.report_type());
        out.s("\",\"fraud_scenario\":\"");
        out.s(l.scenario.name());
        out.s("\",\"transaction_time\":\"");
        write_rfc3339_ms(out, l.tx_ms);
        out.s("\",\"reported_at\":\"");
        write_rfc3339_ms(out, l.due_ms);
        out.s("\"}");
        Some(LabelMeta {
            source,
            transaction_id: l.id,
            reported_at_ms: l.due_ms,
            transaction_time_ms: l.tx_ms,
        })
    }

    fn keep_label(&mut self, msg: &[u8], meta: Meta, scenario: Scenario) {
        let p = &self.params;
        if unit(&mut self.label_rng) >= p.label_report_share {
            return;
        }
        // The id is the first value of every shape.
        let Some(id) = first_string_value(msg) else {
            return;
        };
        let (lo, hi) = (
            p.label_delay_min_days.max(0.0),
            p.label_delay_max_days.max(0.0),
        );
        let u = unit(&mut self.label_rng);
        let days = lo + (hi - lo).max(0.0) * u * u;
        self.order += 1;
        self.labels.push(PendingLabel {
            due_ms: meta.event_time_ms + (days * DAY_MS as f64).ceil() as i64,
            order: self.order,
            tx_ms: meta.event_time_ms,
            source: meta.source as u16,
            shape: meta.shape,
            scenario,
            id: Key::from_slice(id),
        });
    }

    // --- randomness -----------------------------------------------------------------------

    fn unit(&mut self) -> f64 {
        unit(&mut self.rng)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u32) -> u32 {
        ((self.rng.next_u32() as u64 * n as u64) >> 32) as u32
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.unit() * (hi - lo + 1) as f64) as i64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare_normal = Some(r * s);
        r * c
    }

    /// Log-normal cents with median `median` and spread `sigma`, clamped.
    fn lognormal_cents(&mut self, median: f64, sigma: f64, lo: i64, hi: i64) -> i64 {
        let z = self.normal();
        ((median * (sigma * z).exp()) as i64).clamp(lo, hi)
    }

    fn gap(&mut self, lo_ms: i64, hi_ms: i64) -> i64 {
        self.between(lo_ms, hi_ms)
    }

    // --- time -------------------------------------------------------------------------------

    fn week_hour(&self) -> usize {
        let hours = (self.clock_ms + LOCAL_OFFSET_MS).div_euclid(HOUR_MS);
        let day = hours.div_euclid(24);
        // 1970-01-01 was a Thursday; 0 = Monday.
        let weekday = (day + 3).rem_euclid(7) as usize;
        weekday * 24 + hours.rem_euclid(24) as usize
    }

    fn business_hours(&self) -> bool {
        let h = self.week_hour();
        h < 5 * 24 && (8..18).contains(&(h % 24))
    }

    // --- fraud episodes ---------------------------------------------------------------------

    fn should_start(&mut self, hour: usize) -> bool {
        if self.start_q == 0.0 {
            return false;
        }
        let deficit = self.fraud_rate * self.emitted as f64 - self.fraud_emitted as f64;
        let steer = (1.0 + deficit / self.steer_scale).clamp(0.0, 8.0);
        let p = self.start_q * self.fraud_factor[hour] * steer;
        self.chance(p)
    }

    fn pick_scenario(&mut self) -> Scenario {
        let u = self.unit() * self.scenario_cdf[5];
        let i = self.scenario_cdf.iter().position(|&c| u < c).unwrap_or(5);
        // Rounding can land on a switched-off scenario at the end: take the last one on.
        let i = (0..=i)
            .rev()
            .find(|&j| {
                self.scenario_cdf[j]
                    > if j == 0 {
                        0.0
                    } else {
                        self.scenario_cdf[j - 1]
                    }
            })
            .unwrap_or(i);
        Scenario::ALL[i]
    }

    fn start_episode(&mut self, out: &mut Vec<u8>) -> Meta {
        let scenario = self.pick_scenario();
        let mut ep = Episode::new(scenario);
        match scenario {
            Scenario::CardTesting => {
                ep.card = self.below(self.card_owner.len() as u32);
                ep.customer = self.card_owner[ep.card as usize];
                ep.merchant = self.testing_target();
                ep.steps = self.between(5, 12) as u32;
                ep.device = self.rng.next_u64();
                ep.ip = self.fraud_ip();
            }
            Scenario::StolenCardSpree => {
                ep.card = self.below(self.card_owner.len() as u32);
                ep.customer = self.card_owner[ep.card as usize];
                ep.steps = self.between(3, 7) as u32;
                ep.device = self.rng.next_u64();
                ep.ip = if self.chance(0.6) {
                    let h = self.rng.next_u32();
                    self.ip_in(BR, h)
                } else {
                    self.fraud_ip()
                };
            }
            Scenario::AccountTakeover => {
                ep.customer = self.below(self.customers.len() as u32);
                let has_wallet = self.customers[ep.customer as usize].has_wallet;
                let mut options = [
                    (Shape::Pix, 0.5),
                    (Shape::Transfer, 0.35),
                    (Shape::Wallet, 0.15),
                ];
                for o in &mut options {
                    if self.source_of[o.0 as usize].is_none()
                        || (o.0 == Shape::Wallet && !has_wallet)
                    {
                        o.1 = 0.0;
                    }
                }
                if options.iter().all(|o| o.1 == 0.0) {
                    // Only the wallet is configured and this customer has none: give one.
                    self.customers[ep.customer as usize].has_wallet = true;
                    options[2].1 = 1.0;
                }
                let total: f64 = options.iter().map(|o| o.1).sum();
                let mut u = self.unit() * total;
                ep.shape = options
                    .iter()
                    .find(|o| {
                        u -= o.1;
                        u < 0.0 && o.1 > 0.0
                    })
                    .or_else(|| options.iter().rev().find(|o| o.1 > 0.0))
                    .map_or(Shape::Pix, |o| o.0);
                ep.steps = self.between(2, 4) as u32;
                ep.device = self.rng.next_u64();
                ep.ip = self.fraud_ip();
                ep.mule = self.below(self.n_mules);
            }
            Scenario::CompromisedTerminal => {
                ep.merchant = self.skim_spot();
                ep.terminal =
                    self.below(self.merchants[ep.merchant as usize].terminals as u32) as u8;
                ep.split = self.between(6, 12) as u32;
                let repeats = self.below(ep.split / 2);
                ep.steps = 2 * ep.split + repeats;
                ep.list = Vec::with_capacity(ep.split as usize);
            }
            Scenario::ImpossibleTravel => {
                // A card whose owner is somewhere (not on a plane).
                for _ in 0..16 {
                    ep.card = self.below(self.card_owner.len() as u32);
                    ep.customer = self.card_owner[ep.card as usize];
                    if let Whereabouts::City(_) =
                        self.customers[ep.customer as usize].whereabouts(self.clock_ms)
                    {
                        break;
                    }
                }
                ep.steps = self.between(2, 4) as u32;
            }
            Scenario::MuleAccount => {
                ep.mule = self.below(self.n_mules);
                ep.split = self.between(8, 20) as u32;
                ep.steps = ep.split + self.between(1, 2) as u32;
                ep.list = Vec::with_capacity(ep.split as usize);
                ep.device = self.party_device(Party::Mule(ep.mule));
                ep.ip = self.ip_in(BR, hash(self.salt ^ 0x6d75, ep.mule as u64) as u32);
            }
        }
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.episodes[s as usize] = ep;
                s
            }
            None => {
                self.episodes.push(ep);
                (self.episodes.len() - 1) as u32
            }
        };
        self.play(slot, out)
    }

    /// Play the next step of the episode in `slot`, and schedule the one after.
    fn play(&mut self, slot: u32, out: &mut Vec<u8>) -> Meta {
        let mut ep = std::mem::replace(
            &mut self.episodes[slot as usize],
            Episode::new(Scenario::CardTesting),
        );
        let (meta, gap) = match ep.scenario {
            Scenario::CardTesting => self.card_testing(&mut ep, out),
            Scenario::StolenCardSpree => self.stolen_spree(&mut ep, out),
            Scenario::AccountTakeover => self.account_takeover(&mut ep, out),
            Scenario::CompromisedTerminal => self.compromised_terminal(&mut ep, out),
            Scenario::ImpossibleTravel => self.impossible_travel(&mut ep, out),
            Scenario::MuleAccount => self.mule_account(&mut ep, out),
        };
        ep.step += 1;
        if ep.step < ep.steps {
            self.order += 1;
            self.due.push(Due {
                at_ms: self.clock_ms + gap,
                order: self.order,
                slot,
            });
            self.episodes[slot as usize] = ep;
        } else {
            self.free_slots.push(slot);
        }
        meta
    }

    fn card_testing(&mut self, ep: &mut Episode, out: &mut Vec<u8>) -> (Meta, i64) {
        let merchant = if self.chance(0.7) {
            ep.merchant
        } else {
            self.testing_target()
        };
        let cents = if self.chance(0.1) {
            100
        } else {
            self.between(50, 499)
        };
        let declined = self.chance(0.55);
        let response = if declined {
            ["05", "14", "N7", "51"][self.below(4) as usize]
        } else {
            "00"
        };
        let cvv = if response == "N7" || self.chance(0.3) {
            "N"
        } else {
            "M"
        };
        let three_ds = if self.chance(0.7) {
            "not_enrolled"
        } else {
            "attempted"
        };
        let terminal = self.below(self.merchants[merchant as usize].terminals as u32) as u8;
        let msg = CardMsg {
            customer: ep.customer,
            card: ep.card,
            merchant,
            terminal,
            cents_brl: cents,
            entry: "ecommerce",
            cvv,
            three_ds,
            response,
            device: ep.device,
            ip: ep.ip,
            scenario: Some(Scenario::CardTesting),
        };
        // The amount is tiny in any currency: write it as is, not converted.
        let meta = self.write_card(out, &msg, false);
        (meta, self.gap(20_000, 240_000))
    }

    fn stolen_spree(&mut self, ep: &mut Episode, out: &mut Vec<u8>) -> (Meta, i64) {
        let c = ep.customer as usize;
        let home = self.customers[c].city as usize;
        // High-value merchants that are not among the cardholder's favourites.
        let mut merchant = 0;
        for _ in 0..16 {
            let pick = if self.chance(0.55) {
                self.pick_from(ListRef::HighValueOnlineBr)
            } else {
                self.pick_from(ListRef::HighValuePhysical(home))
            };
            merchant = pick.unwrap_or_else(|| self.any_merchant());
            let cust = &self.customers[c];
            if !cust.favourites[..cust.n_fav as usize].contains(&merchant) {
                break;
            }
        }
        let (online, terminals) = {
            let m = &self.merchants[merchant as usize];
            (m.online, m.terminals)
        };
        let cents = self.lognormal_cents(200_000.0, 0.5, 60_000, 1_500_000);
        let terminal = self.below(terminals as u32) as u8;
        let entry = if online {
            "ecommerce"
        } else if self.chance(0.75) {
            "chip"
        } else {
            "magstripe"
        };
        let response = if self.chance(0.85) { "00" } else { "51" };
        let msg = CardMsg {
            customer: ep.customer,
            card: ep.card,
            merchant,
            terminal,
            cents_brl: cents,
            entry,
            cvv: if online { "M" } else { "P" },
            three_ds: if online { "attempted" } else { "none" },
            response,
            device: ep.device,
            ip: ep.ip,
            scenario: Some(Scenario::StolenCardSpree),
        };
        let meta = self.write_card(out, &msg, true);
        (meta, self.gap(3 * MIN_MS, 40 * MIN_MS))
    }

    fn account_takeover(&mut self, ep: &mut Episode, out: &mut Vec<u8>) -> (Meta, i64) {
        let c = ep.customer;
        let band = self.customers[c as usize].band as f64;
        let probe = ep.step == 0;
        let cents = if probe {
            self.between(100, 3_000)
        } else {
            self.lognormal_cents(800_000.0 * (1.0 + 0.5 * band), 0.5, 300_000, 10_000_000)
        };
        // Each large transfer goes to a payee the customer never paid: a mule.
        let mule = if probe || self.chance(0.5) {
            ep.mule
        } else {
            self.below(self.n_mules)
        };
        let account = self.customers[c as usize].first_account;
        let scenario = Some(Scenario::AccountTakeover);
        let meta = match ep.shape {
            Shape::Pix => {
                let msg = PixMsg {
                    payer: Party::Customer { c, account },
                    payee: Party::Mule(mule),
                    cents,
                    initiation: "key",
                    device: ep.device,
                    ip: ep.ip,
                    scenario,
                };
                self.write_pix(out, &msg)
            }
            Shape::Wallet => {
                let msg = WalletMsg {
                    customer: c,
                    what: WalletUse::P2p(self.customers.len() as u32 + mule),
                    card: None,
                    cents_brl: cents,
                    device: ep.device,
                    ip: ep.ip,
                    scenario,
                };
                self.write_wallet(out, &msg)
            }
            Shape::Card | Shape::Transfer => {
                let msg = TransferMsg {
                    customer: c,
                    account,
                    creditor: Party::Mule(mule),
                    kind: "ted",
                    cents,
                    channel: "internet_banking",
                    device: ep.device,
                    ip: ep.ip,
                    scenario,
                };
                self.write_transfer(out, &msg)
            }
        };
        let gap = if probe {
            self.gap(5 * MIN_MS, 30 * MIN_MS)
        } else {
            self.gap(2 * MIN_MS, 20 * MIN_MS)
        };
        (meta, gap)
    }

    fn compromised_terminal(&mut self, ep: &mut Episode, out: &mut Vec<u8>) -> (Meta, i64) {
        if ep.step < ep.split {
            // Harvest: a genuine payment at the skimmed terminal by someone living in the city.
            let city = self.merchants[ep.merchant as usize].city as usize;
            let mut c = 0;
            for _ in 0..16 {
                let n = self.city_customers[city].len() as u32;
                c = if n > 0 {
                    let i = self.below(n) as usize;
                    self.city_customers[city][i]
                } else {
                    self.below(self.customers.len() as u32)
                };
                if self.customers[c as usize].whereabouts(self.clock_ms)
                    == Whereabouts::City(self.customers[c as usize].city)
                {
                    break;
                }
            }
            let cust = &self.customers[c as usize];
            let (first_card, n_cards) = (cust.first_card, cust.n_cards);
            let card = first_card + self.below(n_cards as u32);
            ep.list.push(card);
            let factor = MCCS[self.merchants[ep.merchant as usize].mcc as usize].amount;
            let cents = self.everyday_cents(c, factor);
            let msg = CardMsg {
                customer: c,
                card,
                merchant: ep.merchant,
                terminal: ep.terminal,
                cents_brl: cents,
                entry: if self.chance(0.8) {
                    "chip"
                } else {
                    "magstripe"
                },
                cvv: "P",
                three_ds: "none",
                response: "00",
                device: 0,
                ip: 0,
                scenario: None,
            };
            let meta = self.write_card(out, &msg, true);
            let gap = if ep.step + 1 == ep.split {
                let (lo, hi) = self.params.skim_cashout_delay_days;
                let (lo, hi) = (
                    (lo.max(0.0) * DAY_MS as f64) as i64,
                    (hi.max(lo) * DAY_MS as f64) as i64,
                );
                self.gap(lo, hi.max(lo))
            } else {
                self.gap(10 * MIN_MS, 3 * HOUR_MS)
            };
            return (meta, gap);
        }
        // Cash-out: cloned magnetic stripes at ATMs and shops elsewhere.
        let k = (ep.step - ep.split) as usize % ep.list.len().max(1);
        let card = ep.list.get(k).copied().unwrap_or(0);
        let customer = self.card_owner[card as usize];
        let city = self.below(8) as usize;
        let mut merchant = ep.merchant;
        for _ in 0..16 {
            let pick = if self.chance(0.65) {
                self.pick_from(ListRef::Atms(city))
            } else {
                self.pick_from(ListRef::HighValuePhysical(city))
            };
            merchant = pick.unwrap_or_else(|| self.any_merchant());
            if merchant != ep.merchant {
                break;
            }
        }
        let (mcc, terminals) = {
            let m = &self.merchants[merchant as usize];
            (m.mcc, m.terminals)
        };
        let cents = if mcc == MCC_ATM {
            self.between(4, 30) * 5_000
        } else {
            self.lognormal_cents(150_000.0, 0.5, 50_000, 800_000)
        };
        let terminal = self.below(terminals as u32) as u8;
        let msg = CardMsg {
            customer,
            card,
            merchant,
            terminal,
            cents_brl: cents,
            entry: "magstripe",
            cvv: "P",
            three_ds: "none",
            response: if self.chance(0.9) { "00" } else { "51" },
            device: 0,
            ip: 0,
            scenario: Some(Scenario::CompromisedTerminal),
        };
        let meta = self.write_card(out, &msg, true);
        (meta, self.gap(2 * MIN_MS, 90 * MIN_MS))
    }

    fn impossible_travel(&mut self, ep: &mut Episode, out: &mut Vec<u8>) -> (Meta, i64) {
        let c = ep.customer as usize;
        if ep.step == 0 {
            // The genuine card, where its owner is.
            let here = match self.customers[c].whereabouts(self.clock_ms) {
                Whereabouts::City(city) => city,
                Whereabouts::InTransit => self.customers[c].city,
            };
            let merchant = self
                .pick_from(ListRef::EverydayPhysical(here as usize))
                .unwrap_or_else(|| self.any_merchant());
            let n_far = self.far_cities[here as usize].len() as u32;
            let i = self.below(n_far) as usize;
            ep.city = self.far_cities[here as usize][i];
            let factor = MCCS[self.merchants[merchant as usize].mcc as usize].amount;
            let cents = self.everyday_cents(ep.customer, factor);
            let terminal = self.below(self.merchants[merchant as usize].terminals as u32) as u8;
            let msg = CardMsg {
                customer: ep.customer,
                card: ep.card,
                merchant,
                terminal,
                cents_brl: cents,
                entry: if cents <= 20_000 && self.chance(0.65) {
                    "contactless"
                } else {
                    "chip"
                },
                cvv: "P",
                three_ds: "none",
                response: "00",
                device: 0,
                ip: 0,
                scenario: None,
            };
            let meta = self.write_card(out, &msg, true);
            return (meta, self.gap(2 * MIN_MS, 12 * MIN_MS));
        }
        // The clone, far away.
        let merchant = self
            .pick_from(ListRef::Physical(ep.city as usize))
            .unwrap_or_else(|| self.any_merchant());
        let (mcc, terminals) = {
            let m = &self.merchants[merchant as usize];
            (m.mcc, m.terminals)
        };
        let cents = if mcc == MCC_ATM {
            self.between(4, 20) * 5_000
        } else {
            self.lognormal_cents(90_000.0, 0.6, 20_000, 600_000)
        };
        let terminal = self.below(terminals as u32) as u8;
        let msg = CardMsg {
            customer: ep.customer,
            card: ep.card,
            merchant,
            terminal,
            cents_brl: cents,
            entry: if self.chance(0.7) {
                "magstripe"
            } else {
                "chip"
            },
            cvv: "P",
            three_ds: "none",
            response: "00",
            device: 0,
            ip: 0,
            scenario: Some(Scenario::ImpossibleTravel),
        };
        let meta = self.write_card(out, &msg, true);
        (meta, self.gap(3 * MIN_MS, 15 * MIN_MS))
    }

    fn mule_account(&mut self, ep: &mut Episode, out: &mut Vec<u8>) -> (Meta, i64) {
        let scenario = Some(Scenario::MuleAccount);
        if ep.step < ep.split {
            // A scam victim pays the mule from their own phone.
            let mut payer = 0;
            for _ in 0..32 {
                payer = self.below(self.customers.len() as u32);
                if !ep.list.contains(&payer) {
                    break;
                }
            }
            ep.list.push(payer);
            let mut cents = self.lognormal_cents(40_000.0, 0.7, 5_000, 500_000);
            if self.chance(0.5) {
                cents = (cents / 1_000).max(1) * 1_000;
            }
            ep.collected += cents;
            let account = self.customers[payer as usize].first_account;
            let party = Party::Customer { c: payer, account };
            let device = self.party_device(party);
            let ip = self.customer_ip(payer);
            let msg = PixMsg {
                payer: party,
                payee: Party::Mule(ep.mule),
                cents,
                initiation: if self.chance(0.6) {
                    "key"
                } else {
                    "qr_dynamic"
                },
                device,
                ip,
                scenario,
            };
            let meta = self.write_pix(out, &msg);
            let gap = if ep.step + 1 == ep.split {
                self.gap(10 * MIN_MS, 60 * MIN_MS)
            } else {
                self.gap(3 * MIN_MS, 40 * MIN_MS)
            };
            return (meta, gap);
        }
        // The mule forwards the money to the next account of the chain.
        let outgoing = (ep.steps - ep.split) as i64;
        let keep = 0.85 + 0.13 * self.unit();
        let cents = ((ep.collected as f64 * keep) as i64 / outgoing).max(100);
        let mut next = ep.mule;
        while next == ep.mule && self.n_mules > 1 {
            next = self.below(self.n_mules);
        }
        let msg = PixMsg {
            payer: Party::Mule(ep.mule),
            payee: Party::Mule(next),
            cents,
            initiation: "manual",
            device: ep.device,
            ip: ep.ip,
            scenario,
        };
        let meta = self.write_pix(out, &msg);
        (meta, self.gap(5 * MIN_MS, 30 * MIN_MS))
    }

    // --- genuine traffic --------------------------------------------------------------------

    /// The customer of the next genuine payment. Customers are drawn [`AHEAD`] at a time and
    /// their records touched together: a population larger than the caches (and evicted by the
    /// output stream) then costs one memory latency per batch instead of one per message.
    fn pick_customer(&mut self) -> u32 {
        if self.upcoming_len == 0 {
            let mut touch = 0u64;
            for k in 0..AHEAD {
                let c = self.draw_customer();
                self.upcoming[k] = c;
                let cu = &self.customers[c as usize];
                // One field of each of its three cache lines.
                touch = touch
                    .wrapping_add(cu.trip.back_ms as u64)
                    .wrapping_add(cu.first_card as u64)
                    .wrapping_add(cu.contacts[0] as u64);
            }
            std::hint::black_box(touch);
            self.upcoming_len = AHEAD;
        }
        self.upcoming_len -= 1;
        self.upcoming[self.upcoming_len]
    }

    /// A customer drawn in proportion to their payments per day (alias method).
    fn draw_customer(&mut self) -> u32 {
        let r = self.rng.next_u64();
        let i = (((r >> 32) * self.alias_prob.len() as u64) >> 32) as usize;
        let coin = (r as u32) as f32 * (1.0 / 4_294_967_296.0);
        if coin < self.alias_prob[i] {
            i as u32
        } else {
            self.alias_idx[i]
        }
    }

    fn genuine(&mut self, out: &mut Vec<u8>) -> Meta {
        let c = self.pick_customer();
        self.maybe_plan_trip(c);
        let u = self.unit() as f32;
        let cdf = self.customers[c as usize].channel_cdf;
        let mut shape = Shape::ALL[cdf.iter().position(|&x| u < x).unwrap_or(3)];
        // Transfers happen mostly in business hours; out of them people use PIX.
        if shape == Shape::Transfer
            && self.source_of[Shape::Pix as usize].is_some()
            && !self.business_hours()
            && self.chance(0.7)
        {
            shape = Shape::Pix;
        }
        match shape {
            Shape::Card => self.genuine_card(c, out),
            Shape::Pix => self.genuine_pix(c, out),
            Shape::Wallet => self.genuine_wallet(c, out),
            Shape::Transfer => self.genuine_transfer(c, out),
        }
    }

    fn maybe_plan_trip(&mut self, c: u32) {
        let now = self.clock_ms;
        if now < self.customers[c as usize].trip.back_ms || !self.chance(TRIP_START_P) {
            return;
        }
        let home = self.customers[c as usize].city;
        let city = loop {
            let city = if self.chance(0.7) {
                self.below(8)
            } else {
                8 + self.below(6)
            } as u8;
            if city != home {
                break city;
            }
        };
        let flight = HOUR_MS * 2 + (city_km(home, city) / 750.0 * HOUR_MS as f64) as i64;
        let depart = now + self.gap(2 * HOUR_MS, 36 * HOUR_MS);
        let arrive = depart + flight;
        let leave = arrive + self.gap(2 * DAY_MS, 10 * DAY_MS);
        self.customers[c as usize].trip = Trip {
            city,
            depart_ms: depart,
            arrive_ms: arrive,
            leave_ms: leave,
            back_ms: leave + flight,
        };
    }

    /// A merchant for a genuine purchase by `c`: `online_only` on a plane; shops of where the
    /// customer is; favourites at home, new everyday merchants sometimes.
    fn genuine_merchant(&mut self, c: u32, allow_physical: bool) -> u32 {
        let cust = &self.customers[c as usize];
        let (home, n_fav, n_phys) = (cust.city, cust.n_fav as u32, cust.n_fav_physical as u32);
        let place = cust.whereabouts(self.clock_ms);
        let u = self.unit();
        let pick = match place {
            Whereabouts::City(city) if allow_physical && city != home => {
                // Travelling: shops there, or online favourites.
                if u < 0.75 || n_fav == n_phys {
                    self.pick_from(ListRef::Physical(city as usize))
                } else {
                    let i = n_phys + self.below(n_fav - n_phys);
                    Some(self.customers[c as usize].favourites[i as usize])
                }
            }
            Whereabouts::City(_) if allow_physical => {
                if u < 0.8 && n_fav > 0 {
                    let i = self.below(n_fav);
                    Some(self.customers[c as usize].favourites[i as usize])
                } else if u < 0.92 {
                    self.pick_from(ListRef::EverydayPhysical(home as usize))
                } else {
                    self.pick_from(ListRef::EverydayOnline)
                }
            }
            _ => {
                if u < 0.7 && n_fav > n_phys {
                    let i = n_phys + self.below(n_fav - n_phys);
                    Some(self.customers[c as usize].favourites[i as usize])
                } else {
                    self.pick_from(ListRef::EverydayOnline)
                }
            }
        };
        pick.unwrap_or_else(|| self.any_merchant())
    }

    /// An everyday amount of `c` in cents (BRL): log-normal body, Pareto tail.
    fn everyday_cents(&mut self, c: u32, factor: f64) -> i64 {
        let cust = &self.customers[c as usize];
        let (mu, sigma) = (cust.amount_mu as f64, cust.amount_sigma as f64);
        let z = self.normal();
        let mut x = (mu + sigma * z).exp() * factor;
        if self.chance(TAIL_P) {
            // Pareto, alpha 1.3: rare very large purchases.
            x *= (1.0 - self.unit()).powf(-1.0 / 1.3).min(60.0);
        }
        (x as i64).clamp(100, 20_000_000)
    }

    fn genuine_card(&mut self, c: u32, out: &mut Vec<u8>) -> Meta {
        let cust = &self.customers[c as usize];
        let (first_card, n_cards) = (cust.first_card, cust.n_cards as u32);
        let card = first_card + self.below(n_cards);
        let merchant = self.genuine_merchant(c, true);
        let m = &self.merchants[merchant as usize];
        let (online, mcc, terminals) = (m.online, m.mcc, m.terminals);
        let mut cents = self.everyday_cents(c, MCCS[mcc as usize].amount);
        if mcc == MCC_ATM {
            cents = (cents / 5_000).clamp(2, 200) * 5_000;
        }
        let terminal = self.below(terminals as u32) as u8;
        let (entry, cvv, three_ds) = if online {
            let u = self.unit();
            let tds = if u < 0.7 {
                "authenticated"
            } else if u < 0.9 {
                "attempted"
            } else {
                "not_enrolled"
            };
            ("ecommerce", "M", tds)
        } else {
            let u = self.unit();
            let entry = if mcc != MCC_ATM && cents <= 20_000 && u < 0.65 {
                "contactless"
            } else if u < 0.98 {
                "chip"
            } else {
                "magstripe"
            };
            (entry, "P", "none")
        };
        let u = self.unit();
        let response = if u < 0.975 {
            "00"
        } else if u < 0.99 {
            "51"
        } else {
            "05"
        };
        let (device, ip) = if online {
            (self.customer_device(c), self.customer_ip(c))
        } else {
            (0, 0)
        };
        let msg = CardMsg {
            customer: c,
            card,
            merchant,
            terminal,
            cents_brl: cents,
            entry,
            cvv,
            three_ds,
            response,
            device,
            ip,
            scenario: None,
        };
        self.write_card(out, &msg, true)
    }

    fn genuine_pix(&mut self, c: u32, out: &mut Vec<u8>) -> Meta {
        let cust = &self.customers[c as usize];
        let (first_account, n_accounts, n_contacts) = (
            cust.first_account,
            cust.n_accounts as u32,
            cust.n_contacts as u32,
        );
        let account = first_account + self.below(n_accounts);
        let u = self.unit();
        let (payee, initiation, factor) = if u < 0.1 && n_accounts > 1 {
            // Between one's own accounts.
            let other = first_account + (account - first_account + 1) % n_accounts;
            (Party::Customer { c, account: other }, "manual", 3.0)
        } else if u < 0.6 && n_contacts > 0 {
            let i = self.below(n_contacts);
            let friend = self.customers[c as usize].contacts[i as usize];
            let account = self.customers[friend as usize].first_account;
            (Party::Customer { c: friend, account }, "key", 1.5)
        } else {
            let m = self.genuine_merchant(c, true);
            let init = if self.chance(0.6) {
                "qr_dynamic"
            } else {
                "qr_static"
            };
            (
                Party::Merchant(m),
                init,
                MCCS[self.merchants[m as usize].mcc as usize].amount,
            )
        };
        let mut cents = self.everyday_cents(c, factor);
        if initiation != "qr_dynamic" && self.chance(0.4) {
            let step = if cents > 20_000 { 5_000 } else { 1_000 };
            cents = (cents / step).max(1) * step;
        }
        let party = Party::Customer { c, account };
        let device = self.party_device(party);
        let ip = self.customer_ip(c);
        let msg = PixMsg {
            payer: party,
            payee,
            cents,
            initiation,
            device,
            ip,
            scenario: None,
        };
        self.write_pix(out, &msg)
    }

    fn genuine_wallet(&mut self, c: u32, out: &mut Vec<u8>) -> Meta {
        let cust = &self.customers[c as usize];
        let (provider, first_card, n_cards, n_contacts) = (
            cust.wallet_provider,
            cust.first_card,
            cust.n_cards as u32,
            cust.n_contacts as u32,
        );
        let u = self.unit();
        let what = if u < 0.15 && n_contacts > 0 {
            let i = self.below(n_contacts);
            WalletUse::P2p(self.customers[c as usize].contacts[i as usize])
        } else {
            let m = self.genuine_merchant(c, u < 0.7);
            if self.merchants[m as usize].online {
                WalletUse::InApp(m)
            } else {
                WalletUse::Nfc(m)
            }
        };
        // Card-based wallets pay with a card; account-based ones mostly from the balance.
        let by_card = provider < 3 || self.chance(0.3);
        let card = if by_card {
            Some(first_card + self.below(n_cards))
        } else {
            None
        };
        let factor = match what {
            WalletUse::Nfc(m) | WalletUse::InApp(m) => {
                MCCS[self.merchants[m as usize].mcc as usize].amount * 0.8
            }
            WalletUse::P2p(_) => 1.2,
        };
        let cents = self.everyday_cents(c, factor);
        let device = self.customer_device(c);
        let ip = self.customer_ip(c);
        let msg = WalletMsg {
            customer: c,
            what,
            card,
            cents_brl: cents,
            device,
            ip,
            scenario: None,
        };
        self.write_wallet(out, &msg)
    }

    fn genuine_transfer(&mut self, c: u32, out: &mut Vec<u8>) -> Meta {
        let cust = &self.customers[c as usize];
        let (first_account, n_accounts, n_contacts) = (
            cust.first_account,
            cust.n_accounts as u32,
            cust.n_contacts as u32,
        );
        let account = first_account + self.below(n_accounts);
        let u = self.unit();
        let (kind, creditor, factor) = if u < 0.5 {
            let biller = self
                .pick_from(ListRef::Billers)
                .unwrap_or_else(|| self.any_merchant());
            ("boleto", Party::Merchant(biller), 4.0)
        } else if u < 0.8 && n_contacts > 0 {
            let i = self.below(n_contacts);
            let friend = self.customers[c as usize].contacts[i as usize];
            let account = self.customers[friend as usize].first_account;
            ("ted", Party::Customer { c: friend, account }, 6.0)
        } else if n_accounts > 1 {
            let other = first_account + (account - first_account + 1) % n_accounts;
            ("internal", Party::Customer { c, account: other }, 5.0)
        } else {
            let biller = self
                .pick_from(ListRef::Billers)
                .unwrap_or_else(|| self.any_merchant());
            ("boleto", Party::Merchant(biller), 4.0)
        };
        let cents = self.everyday_cents(c, factor);
        let channel = if self.chance(0.75) {
            "mobile_app"
        } else {
            "internet_banking"
        };
        let device = self.customer_device(c);
        let ip = self.customer_ip(c);
        let msg = TransferMsg {
            customer: c,
            account,
            creditor,
            kind,
            cents,
            channel,
            device,
            ip,
            scenario: None,
        };
        self.write_transfer(out, &msg)
    }

    // --- entities -----------------------------------------------------------------------------

    fn any_merchant(&mut self) -> u32 {
        self.below(self.merchants.len() as u32)
    }

    fn pick_from(&mut self, list: ListRef) -> Option<u32> {
        let ix = &self.index;
        let l: &[u32] = match list {
            ListRef::Physical(c) => &ix.physical_by_city[c],
            ListRef::EverydayPhysical(c) => &ix.everyday_physical_by_city[c],
            ListRef::HighValuePhysical(c) => &ix.high_value_physical_by_city[c],
            ListRef::Atms(c) => &ix.atms_by_city[c],
            ListRef::EverydayOnline => &ix.everyday_online,
            ListRef::HighValueOnlineBr => &ix.high_value_online_br,
            ListRef::Billers => &ix.billers,
        };
        if l.is_empty() {
            return None;
        }
        let i = ((self.rng.next_u32() as u64 * l.len() as u64) >> 32) as usize;
        Some(l[i])
    }

    fn testing_target(&mut self) -> u32 {
        let n = self.index.testing_targets.len() as u32;
        if n == 0 {
            return self.any_merchant();
        }
        let i = self.below(n) as usize;
        self.index.testing_targets[i]
    }

    fn skim_spot(&mut self) -> u32 {
        let n = self.index.skim_spots.len() as u32;
        if n == 0 {
            return self.any_merchant();
        }
        let i = self.below(n) as usize;
        self.index.skim_spots[i]
    }

    fn customer_device(&mut self, c: u32) -> u64 {
        let n = self.customers[c as usize].n_devices as u32;
        let slot = self.below(n.max(1));
        hash(self.salt ^ 0xde71ce, (c as u64) << 4 | slot as u64)
    }

    fn party_device(&mut self, p: Party) -> u64 {
        match p {
            Party::Customer { c, .. } => self.customer_device(c),
            Party::Mule(m) => hash(
                self.salt ^ 0xde71ce,
                ((self.customers.len() as u64 + m as u64) << 4) | 1,
            ),
            Party::Merchant(m) => hash(self.salt ^ 0xde71ce ^ 0x77, m as u64),
        }
    }

    /// One of the customer's two addresses (home broadband, mobile), in the home country.
    fn customer_ip(&mut self, c: u32) -> u32 {
        let slot = self.below(2) as u64;
        let h = hash(self.salt ^ 0x1b, (c as u64) << 1 | slot) as u32;
        self.ip_in(BR, h)
    }

    fn ip_in(&self, country: u8, h: u32) -> u32 {
        let prefixes = COUNTRIES[country as usize].ip_prefixes;
        let first = prefixes[(h % prefixes.len() as u32) as usize] as u32;
        (first << 24) | (h.rotate_left(7) & 0x00ff_ffff) | 1
    }

    fn fraud_ip(&mut self) -> u32 {
        let i = self.below(FRAUD_IP_COUNTRIES.len() as u32) as usize;
        let h = self.rng.next_u32();
        self.ip_in(FRAUD_IP_COUNTRIES[i], h)
    }

    fn account_number(&self, p: Party) -> u64 {
        match p {
            Party::Customer { account, .. } => account as u64,
            Party::Merchant(m) => MERCHANT_ACCOUNT_BASE + m as u64,
            Party::Mule(m) => MULE_ACCOUNT_BASE + m as u64,
        }
    }

    /// The person behind a party (customer index; mules are numbered after the customers).
    fn person(&self, p: Party) -> u64 {
        match p {
            Party::Customer { c, .. } => c as u64,
            Party::Mule(m) => self.customers.len() as u64 + m as u64,
            Party::Merchant(m) => (1u64 << 40) + m as u64,
        }
    }

    // --- writers ------------------------------------------------------------------------------

    fn write_labels(out: &mut Vec<u8>, scenario: Option<Scenario>) {
        match scenario {
            Some(s) => {
                out.s(",\"is_fraud\":true,\"fraud_scenario\":\"");
                out.s(s.name());
                out.s("\"}");
            }
            None => out.s(",\"is_fraud\":false,\"fraud_scenario\":null}"),
        }
    }

    fn write_id(&self, out: &mut Vec<u8>, prefix: &str, sep: &str) {
        out.s(prefix);
        out.b(self.seed_hex.as_bytes());
        out.s(sep);
        out.pad(self.seq, 10);
    }

    /// Card authorisation, acquirer style. `convert`: amount in BRL, converted to the merchant's
    /// currency.
    fn write_card(&mut self, out: &mut Vec<u8>, m: &CardMsg, convert: bool) -> Meta {
        let mer = &self.merchants[m.merchant as usize];
        let country = &COUNTRIES[CITIES[mer.city as usize].country as usize];
        let cents = if convert {
            ((m.cents_brl as f64 * country.fx) as i64).max(1)
        } else {
            m.cents_brl
        };
        out.s("{\"auth_id\":\"");
        self.write_id(out, "auth-", "-");
        out.s("\",\"ts\":\"");
        self.hour.rfc3339(out, self.clock_ms);
        out.s("\",\"pan_token\":\"");
        let k0 = out.len();
        out.s("tok_");
        out.pad(m.card as u64, 8);
        let key = Key::from_slice(&out[k0..]);
        out.s("\",\"customer_ref\":\"cus_");
        out.pad(m.customer as u64, 7);
        out.s("\",\"merchant_id\":\"mer_");
        out.pad(m.merchant as u64, 6);
        out.s("\",\"terminal_id\":\"ter_");
        out.pad(m.merchant as u64, 6);
        out.s("_");
        out.u(m.terminal as u64);
        out.s("\",\"mcc\":\"");
        out.s(MCCS[mer.mcc as usize].code);
        out.s("\",\"amount\":\"");
        out.cents(cents);
        out.s("\",\"currency\":\"");
        out.s(country.currency);
        out.s("\",\"country\":\"");
        out.s(country.code);
        out.s("\",\"entry_mode\":\"");
        out.s(m.entry);
        out.s("\",\"cvv_result\":\"");
        out.s(m.cvv);
        out.s("\",\"three_ds\":\"");
        out.s(m.three_ds);
        out.s("\",\"response_code\":\"");
        out.s(m.response);
        if mer.online {
            out.s("\",\"device_id\":\"dev_");
            out.hex(m.device);
            out.s("\",\"ip\":\"");
            out.ip(m.ip);
            out.s("\"");
        } else {
            out.s("\",\"lat\":");
            out.coord(mer.lat as f64);
            out.s(",\"lon\":");
            out.coord(mer.lon as f64);
        }
        Self::write_labels(out, m.scenario);
        self.meta(Shape::Card, key, m.scenario)
    }

    fn meta(&self, shape: Shape, key: Key, scenario: Option<Scenario>) -> Meta {
        Meta {
            source: self.source_of[shape as usize]
                .or_else(|| self.source_of.iter().flatten().next().copied())
                .unwrap_or(0),
            shape,
            key,
            event_time_ms: self.clock_ms,
            is_fraud: scenario.is_some(),
            scenario,
        }
    }

    fn write_account(&self, out: &mut Vec<u8>, role: &str, p: Party) {
        let n = self.account_number(p);
        let h = hash(self.salt ^ 0xacc, n);
        out.s("\"");
        out.s(role);
        out.s("_ispb\":\"");
        out.s(BANKS[(h % BANKS.len() as u64) as usize]);
        out.s("\",\"");
        out.s(role);
        out.s("_branch\":\"");
        out.pad(1000 + (h >> 20) % 9000, 4);
        out.s("\",\"");
        out.s(role);
        out.s("_account\":\"");
        write_account_number(out, n);
        out.s("\"");
    }

    /// The account as one string `ispb-branch-number` (keys; the mappings build the same).
    fn account_key(&self, p: Party) -> Key {
        let n = self.account_number(p);
        let h = hash(self.salt ^ 0xacc, n);
        let mut buf = Vec::with_capacity(32);
        buf.s(BANKS[(h % BANKS.len() as u64) as usize]);
        buf.s("-");
        buf.pad(1000 + (h >> 20) % 9000, 4);
        buf.s("-");
        write_account_number(&mut buf, n);
        Key::from_slice(&buf)
    }

    fn write_cpf(&self, out: &mut Vec<u8>, person: u64) {
        let base = hash(self.salt ^ 0xc9f, person) % 1_000_000_000;
        let mut d = [0u8; 11];
        let mut x = base;
        for i in (0..9).rev() {
            d[i] = (x % 10) as u8;
            x /= 10;
        }
        for k in 9..11 {
            let sum: u32 = (0..k)
                .map(|i| d[i] as u32 * (k as u32 + 1 - i as u32))
                .sum();
            let r = (sum * 10) % 11;
            d[k] = if r == 10 { 0 } else { r as u8 };
        }
        for x in d {
            out.push(b'0' + x);
        }
    }

    fn write_evp(&self, out: &mut Vec<u8>, salt: u64, id: u64) {
        let a = hash(self.salt ^ salt, id);
        let b = hash(self.salt ^ salt ^ 0x55, id);
        let mut hex = [0u8; 32];
        for i in 0..16 {
            hex[i] = HEX[(a >> (60 - 4 * i) & 0xf) as usize];
            hex[16 + i] = HEX[(b >> (60 - 4 * i) & 0xf) as usize];
        }
        hex[12] = b'4';
        out.b(&hex[..8]);
        out.s("-");
        out.b(&hex[8..12]);
        out.s("-");
        out.b(&hex[12..16]);
        out.s("-");
        out.b(&hex[16..20]);
        out.s("-");
        out.b(&hex[20..]);
    }

    /// `"<role>_key":"…","<role>_key_type":"…"` of a payee.
    fn write_payee_key(&self, out: &mut Vec<u8>, p: Party) {
        out.s("\"payee_key\":\"");
        let kind = match p {
            Party::Customer { c, .. } => {
                let h = hash(self.salt ^ 0x7e1, c as u64);
                match h % 4 {
                    0 => {
                        self.write_cpf(out, c as u64);
                        "cpf"
                    }
                    1 => {
                        out.s("+55");
                        out.u(CITIES[self.customers[c as usize].city as usize].ddd as u64);
                        out.s("9");
                        out.pad((h >> 8) % 100_000_000, 8);
                        "phone"
                    }
                    2 => {
                        out.s("u");
                        out.pad((h >> 8) % 100_000_000, 8);
                        out.s("@");
                        out.s(EMAIL_DOMAINS[((h >> 40) % EMAIL_DOMAINS.len() as u64) as usize]);
                        "email"
                    }
                    _ => {
                        self.write_evp(out, 0xe7, c as u64);
                        "evp"
                    }
                }
            }
            Party::Merchant(m) => {
                let h = hash(self.salt ^ 0xc17, m as u64);
                if h % 10 < 7 {
                    out.pad(h % 100_000_000_000_000, 14);
                    "cnpj"
                } else {
                    self.write_evp(out, 0xe8, m as u64);
                    "evp"
                }
            }
            Party::Mule(m) => {
                self.write_evp(out, 0xe9, m as u64);
                "evp"
            }
        };
        out.s("\",\"payee_key_type\":\"");
        out.s(kind);
        out.s("\",");
    }

    fn write_pix(&mut self, out: &mut Vec<u8>, m: &PixMsg) -> Meta {
        let payer_n = self.account_number(m.payer);
        let ispb = BANKS[(hash(self.salt ^ 0xacc, payer_n) % BANKS.len() as u64) as usize];
        out.s("{\"end_to_end_id\":\"E");
        out.s(ispb);
        self.hour.compact(out, self.clock_ms);
        // 11 alphanumerics: the sequence number, offset by the seed, in base 36.
        let mut x = (self.seq + hash(self.salt, 0xe2e) % 1_000_000_000_000) % 36u64.pow(11);
        let mut b36 = [b'0'; 11];
        for d in b36.iter_mut().rev() {
            *d = b"0123456789abcdefghijklmnopqrstuvwxyz"[(x % 36) as usize];
            x /= 36;
        }
        out.b(&b36);
        out.s("\",\"created_at\":\"");
        self.hour.rfc3339(out, self.clock_ms);
        out.s("\",\"amount\":\"");
        out.cents(m.cents);
        out.s("\",\"customer_ref\":\"cus_");
        out.pad(self.person(m.payer), 7);
        out.s("\",\"payer_key\":\"");
        let k0 = out.len();
        self.write_cpf(out, self.person(m.payer));
        let key = Key::from_slice(&out[k0..]);
        out.s("\",\"payer_key_type\":\"cpf\",");
        self.write_account(out, "payer", m.payer);
        out.s(",");
        self.write_payee_key(out, m.payee);
        self.write_account(out, "payee", m.payee);
        out.s(",\"initiation\":\"");
        out.s(m.initiation);
        out.s("\",\"device_id\":\"dev_");
        out.hex(m.device);
        out.s("\",\"ip\":\"");
        out.ip(m.ip);
        out.s("\"");
        Self::write_labels(out, m.scenario);
        self.meta(Shape::Pix, key, m.scenario)
    }

    fn write_wallet(&mut self, out: &mut Vec<u8>, m: &WalletMsg) -> Meta {
        let c = &self.customers[m.customer as usize];
        let (kind, merchant) = match m.what {
            WalletUse::Nfc(x) => ("nfc", Some(x)),
            WalletUse::InApp(x) => ("in_app", Some(x)),
            WalletUse::P2p(_) => ("p2p", None),
        };
        let country = merchant.map_or(&COUNTRIES[BR as usize], |x| {
            &COUNTRIES[CITIES[self.merchants[x as usize].city as usize].country as usize]
        });
        out.s("{\"payment_id\":\"");
        self.write_id(out, "wpay_", "_");
        out.s("\",\"created\":\"");
        self.hour.rfc3339(out, self.clock_ms);
        out.s("\",\"wallet_id\":\"");
        let k0 = out.len();
        out.s("wal_");
        out.pad(m.customer as u64, 8);
        let key = Key::from_slice(&out[k0..]);
        out.s("\",\"provider\":\"");
        out.s(WALLET_PROVIDERS[c.wallet_provider as usize]);
        out.s("\",\"payment_type\":\"");
        out.s(kind);
        match m.card {
            Some(card) => {
                out.s("\",\"funding\":\"card\",\"card_token\":\"tok_");
                out.pad(card as u64, 8);
            }
            None => out.s("\",\"funding\":\"balance"),
        }
        out.s("\",\"customer_ref\":\"cus_");
        out.pad(m.customer as u64, 7);
        match m.what {
            WalletUse::Nfc(x) | WalletUse::InApp(x) => {
                out.s("\",\"merchant_ref\":\"mer_");
                out.pad(x as u64, 6);
                out.s("\",\"mcc\":\"");
                out.s(MCCS[self.merchants[x as usize].mcc as usize].code);
            }
            WalletUse::P2p(w) => {
                out.s("\",\"counterparty\":\"wal_");
                out.pad(w as u64, 8);
            }
        }
        out.s("\",\"amount_minor\":");
        out.u(((m.cents_brl as f64 * country.fx) as u64).max(1));
        out.s(",\"currency\":\"");
        out.s(country.currency);
        out.s("\",\"device_id\":\"dev_");
        out.hex(m.device);
        out.s("\",\"ip\":\"");
        out.ip(m.ip);
        out.s("\"");
        Self::write_labels(out, m.scenario);
        self.meta(Shape::Wallet, key, m.scenario)
    }

    fn write_transfer(&mut self, out: &mut Vec<u8>, m: &TransferMsg) -> Meta {
        let debtor = Party::Customer {
            c: m.customer,
            account: m.account,
        };
        out.s("{\"transfer_id\":\"");
        self.write_id(out, "trf-", "-");
        out.s("\",\"requested_at\":");
        out.u(self.clock_ms.max(0) as u64);
        out.s(",\"kind\":\"");
        out.s(m.kind);
        out.s("\",\"customer_id\":\"cus_");
        out.pad(m.customer as u64, 7);
        out.s("\",");
        self.write_account(out, "debtor", debtor);
        out.s(",");
        self.write_account(out, "creditor", m.creditor);
        if m.kind == "boleto" {
            // The typed line: bank, currency 9, free field, check digit, due factor, amount.
            out.s(",\"barcode\":\"");
            let h = hash(self.salt ^ 0xb01, self.seq);
            out.pad(h % 1000, 3);
            out.s("9");
            out.pad(h % 100_000_000_000_000, 14);
            out.pad(hash(h, 1) % 100_000_000_000_000, 14);
            out.u(h % 10);
            let due_factor = 1000 + (self.clock_ms / DAY_MS).rem_euclid(9000) as u64;
            out.pad(due_factor, 4);
            out.pad(m.cents.max(0) as u64 % 10_000_000_000, 10);
            out.s("\"");
        }
        out.s(",\"amount\":");
        out.cents(m.cents);
        out.s(",\"currency\":\"BRL\",\"channel\":\"");
        out.s(m.channel);
        out.s("\",\"device_id\":\"dev_");
        out.hex(m.device);
        out.s("\",\"ip\":\"");
        out.ip(m.ip);
        out.s("\"");
        Self::write_labels(out, m.scenario);
        let key = self.account_key(debtor);
        self.meta(Shape::Transfer, key, m.scenario)
    }
}

#[derive(Debug, Clone, Copy)]
enum ListRef {
    Physical(usize),
    EverydayPhysical(usize),
    HighValuePhysical(usize),
    Atms(usize),
    EverydayOnline,
    HighValueOnlineBr,
    Billers,
}

// ---------------------------------------------------------------------------------------------
// Building the population
// ---------------------------------------------------------------------------------------------

struct Builder<'a> {
    rng: &'a mut ChaCha8Rng,
}

impl Builder<'_> {
    fn unit(&mut self) -> f64 {
        unit(self.rng)
    }

    fn below(&mut self, n: u32) -> u32 {
        ((self.rng.next_u32() as u64 * n as u64) >> 32) as u32
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn weighted(&mut self, weights: impl Iterator<Item = f64> + Clone) -> usize {
        let total: f64 = weights.clone().sum();
        let mut x = self.unit() * total;
        let mut last = 0;
        for (i, w) in weights.enumerate() {
            if w > 0.0 {
                last = i;
                if x < w {
                    return i;
                }
            }
            x -= w;
        }
        last
    }

    fn home_city(&mut self) -> u8 {
        self.weighted(CITIES.iter().map(|c| c.home_weight)) as u8
    }

    fn merchants(&mut self, n: usize) -> Vec<Merchant> {
        (0..n)
            .map(|_| {
                let city = if self.unit() < 0.88 {
                    self.home_city()
                } else {
                    8 + self.below(CITIES.len() as u32 - 8) as u8
                };
                let mcc = self.weighted(MCCS.iter().map(|m| m.weight)) as u8;
                let online = self.unit() < MCCS[mcc as usize].online;
                let c = &CITIES[city as usize];
                let lat = c.lat + self.range(-0.15, 0.15);
                let lon = c.lon + self.range(-0.15, 0.15);
                Merchant {
                    mcc,
                    city,
                    terminals: if online { 1 } else { 1 + self.below(8) as u8 },
                    online,
                    lat: lat as f32,
                    lon: lon as f32,
                }
            })
            .collect()
    }

    /// Customers, the owner of every card, and each customer's payments per day.
    fn customers(
        &mut self,
        n: usize,
        merchants: &[Merchant],
        index: &MerchantIndex,
        configured: [bool; 4],
        params: &SimulatorParams,
    ) -> (Vec<Customer>, Vec<u32>, Vec<f64>) {
        const BAND_SHARES: [f64; 5] = [0.30, 0.30, 0.22, 0.13, 0.05];
        // Median everyday amount by income band, cents.
        const BAND_MEDIANS: [f64; 5] = [3_500.0, 6_000.0, 11_000.0, 22_000.0, 45_000.0];
        let mut card_owner = Vec::with_capacity(n * 3 / 2);
        let mut next_account = 0u32;
        let mut weights = Vec::with_capacity(n);
        let mut customers = Vec::with_capacity(n);
        for i in 0..n as u32 {
            let city = self.home_city();
            let band = self.weighted(BAND_SHARES.iter().copied()) as u8;
            let n_cards = 1 + (self.unit() < 0.35) as u8 + (self.unit() < 0.1) as u8;
            let first_card = card_owner.len() as u32;
            for _ in 0..n_cards {
                card_owner.push(i);
            }
            let n_accounts = 1 + (self.unit() < 0.3) as u8;
            let first_account = next_account;
            next_account += n_accounts as u32;
            let has_wallet = self.unit() < 0.45 + 0.1 * band as f64;
            let mut w = [
                self.range(0.35, 0.75),
                self.range(0.15, 0.50),
                if has_wallet {
                    self.range(0.05, 0.30)
                } else {
                    0.0
                },
                self.range(0.03, 0.10),
            ];
            for (x, on) in w.iter_mut().zip(configured) {
                if !on {
                    *x = 0.0;
                }
            }
            let mut has_wallet = has_wallet;
            if w.iter().sum::<f64>() == 0.0 {
                // Only the wallet is configured: everybody has one.
                has_wallet = true;
                w[2] = 1.0;
            }
            let total: f64 = w.iter().sum();
            let mut channel_cdf = [0f32; 4];
            let mut acc = 0.0;
            for (cdf, x) in channel_cdf.iter_mut().zip(w) {
                acc += x / total;
                *cdf = acc as f32;
            }
            channel_cdf[3] = 1.0;

            // Favourite merchants, by the customer's own taste in categories.
            let taste: Vec<f64> = MCCS
                .iter()
                .map(|m| {
                    if m.class == MccClass::Biller {
                        0.0
                    } else {
                        m.weight * (0.8 * self.normal()).exp()
                    }
                })
                .collect();
            let online_taste = self.range(0.5, 1.5);
            let n_fav = 5 + self.below(7) as usize;
            let mut favs: Vec<u32> = Vec::with_capacity(n_fav);
            for _ in 0..n_fav {
                let mcc = self.weighted(taste.iter().copied());
                let online = self.unit() < MCCS[mcc].online * online_taste;
                let list = if online {
                    &index.online_by_mcc[mcc]
                } else {
                    &index.physical_by_mcc_city[mcc][city as usize]
                };
                let list = if list.is_empty() {
                    &index.physical_by_city[city as usize]
                } else {
                    list
                };
                let list = if list.is_empty() { &index.all } else { list };
                let m = list[self.below(list.len() as u32) as usize];
                if !favs.contains(&m) {
                    favs.push(m);
                }
            }
            // Shops in the home city first, then online ones (and, rarely, far-away shops:
            // treated as online-only favourites would be wrong, so they are dropped).
            let mut favourites = [0u32; MAX_FAV];
            let mut n_phys = 0;
            for &m in &favs {
                let mm = &merchants[m as usize];
                if !mm.online && mm.city == city {
                    favourites[n_phys] = m;
                    n_phys += 1;
                }
            }
            let mut n_f = n_phys;
            for &m in &favs {
                if merchants[m as usize].online {
                    favourites[n_f] = m;
                    n_f += 1;
                }
            }
            let n_contacts = 2 + self.below(5) as usize;
            let mut contacts = [0u32; MAX_CONTACTS];
            for c in contacts.iter_mut().take(n_contacts) {
                let mut friend = self.below(n as u32);
                if friend == i && n > 1 {
                    friend = (friend + 1) % n as u32;
                }
                *c = friend;
            }
            let median = BAND_MEDIANS[band as usize] * (0.3 * self.normal()).exp();
            weights.push(
                (params.mean_tx_per_day.max(0.0) * (0.7 * self.normal() - 0.245).exp())
                    .clamp(0.0, 50.0),
            );
            customers.push(Customer {
                city,
                band,
                n_cards,
                n_accounts,
                n_devices: 1 + self.below(3) as u8,
                n_fav: n_f as u8,
                n_fav_physical: n_phys as u8,
                n_contacts: n_contacts as u8,
                has_wallet,
                wallet_provider: self.below(WALLET_PROVIDERS.len() as u32) as u8,
                amount_mu: median.ln() as f32,
                amount_sigma: self.range(0.6, 1.0) as f32,
                channel_cdf,
                first_card,
                first_account,
                favourites,
                contacts,
                trip: Trip::default(),
            });
        }
        if weights.iter().sum::<f64>() <= 0.0 {
            weights.iter_mut().for_each(|w| *w = 1.0);
        }
        (customers, card_owner, weights)
    }
}

impl MerchantIndex {
    fn build(merchants: &[Merchant]) -> Self {
        let nc = CITIES.len();
        let mut ix = MerchantIndex {
            physical_by_city: vec![Vec::new(); nc],
            everyday_physical_by_city: vec![Vec::new(); nc],
            high_value_physical_by_city: vec![Vec::new(); nc],
            atms_by_city: vec![Vec::new(); nc],
            physical_by_mcc_city: vec![vec![Vec::new(); nc]; MCCS.len()],
            online_by_mcc: vec![Vec::new(); MCCS.len()],
            ..Default::default()
        };
        for (i, m) in merchants.iter().enumerate() {
            let i = i as u32;
            let class = MCCS[m.mcc as usize].class;
            let city = m.city as usize;
            let br = CITIES[city].country == BR;
            ix.all.push(i);
            if m.online {
                ix.online_by_mcc[m.mcc as usize].push(i);
                if matches!(class, MccClass::Everyday | MccClass::Digital) {
                    ix.everyday_online.push(i);
                }
                if class == MccClass::HighValue && br {
                    ix.high_value_online_br.push(i);
                }
                if class == MccClass::Digital {
                    ix.testing_targets.push(i);
                }
                if class == MccClass::Biller {
                    ix.billers.push(i);
                }
            } else {
                ix.physical_by_city[city].push(i);
                ix.physical_by_mcc_city[m.mcc as usize][city].push(i);
                match class {
                    MccClass::Everyday | MccClass::Digital => {
                        ix.everyday_physical_by_city[city].push(i)
                    }
                    MccClass::HighValue => ix.high_value_physical_by_city[city].push(i),
                    MccClass::Atm => ix.atms_by_city[city].push(i),
                    MccClass::Biller | MccClass::Other => {}
                }
                if br && matches!(MCCS[m.mcc as usize].code, "5541" | "6011" | "5812" | "5411") {
                    ix.skim_spots.push(i);
                }
            }
        }
        ix
    }
}

/// Vose's alias table: O(1) draws from a discrete distribution.
fn alias_table(weights: &[f64]) -> (Vec<f32>, Vec<u32>) {
    let n = weights.len();
    let total: f64 = weights.iter().sum();
    let mut prob: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
    let mut alias: Vec<u32> = (0..n as u32).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| prob[i] < 1.0);
    while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
        alias[s] = l as u32;
        prob[l] -= 1.0 - prob[s];
        if prob[l] < 1.0 {
            large.pop();
            small.push(l);
        }
    }
    for i in large.into_iter().chain(small) {
        prob[i] = 1.0;
    }
    (prob.into_iter().map(|p| p as f32).collect(), alias)
}

fn city_km(a: u8, b: u8) -> f64 {
    let (a, b) = (&CITIES[a as usize], &CITIES[b as usize]);
    haversine_km(a.lat, a.lon, b.lat, b.lon)
}

fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// SplitMix64 of `salt + x`: stable pseudo-random attributes of entities, drawn on demand.
fn hash(salt: u64, x: u64) -> u64 {
    let mut z = salt.wrapping_add(x.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The value of the first key of a JSON object written by this module (`{"k":"value",…`).
fn first_string_value(msg: &[u8]) -> Option<&[u8]> {
    let colon = msg.iter().position(|&b| b == b':')?;
    let rest = msg.get(colon + 2..)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    Some(&rest[..end])
}

/// Account numbers look random but are unique: a bijection of `0..10^8`, plus a check digit.
fn write_account_number(out: &mut Vec<u8>, n: u64) {
    let x = (n.wrapping_mul(2_654_435_761) + 12_345_679) % 100_000_000;
    out.pad(x, 8);
    out.s("-");
    out.u(x % 11 % 10);
}

// ---------------------------------------------------------------------------------------------
// Formatting without `format!`
// ---------------------------------------------------------------------------------------------

const HEX: &[u8; 16] = b"0123456789abcdef";
const DIGITS2: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Appending formatted values to a byte buffer.
trait Put {
    fn s(&mut self, s: &str);
    fn b(&mut self, b: &[u8]);
    /// Decimal, zero-padded to at least `width` digits (at most 20).
    fn pad(&mut self, n: u64, width: usize);
    /// Decimal.
    fn u(&mut self, n: u64) {
        self.pad(n, 1);
    }
    /// Cents as `units.cc`.
    fn cents(&mut self, cents: i64);
    /// Degrees with 4 decimals.
    fn coord(&mut self, x: f64);
    /// 16 hex digits.
    fn hex(&mut self, x: u64);
    /// Dotted IPv4.
    fn ip(&mut self, ip: u32);
}

impl Put for Vec<u8> {
    #[inline(always)]
    fn s(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }

    #[inline(always)]
    fn b(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }

    #[inline]
    fn pad(&mut self, n: u64, width: usize) {
        // The usual case: an id that fits its width.
        macro_rules! fits {
            ($($w:literal)*) => {
                match width {
                    $($w if n < 10u64.pow($w) => return fixed::<$w>(self, n),)*
                    _ => {}
                }
            };
        }
        fits!(2 3 4 6 7 8 10 14);
        let digits = n.checked_ilog10().map_or(1, |d| d as usize + 1);
        // Every width its own constant-size copy: no call to memmove per number.
        macro_rules! by_width {
            ($($w:literal)*) => {
                match digits.max(width) {
                    $($w => fixed::<$w>(self, n),)*
                    _ => fixed::<20>(self, n),
                }
            };
        }
        by_width!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19);
    }

    fn cents(&mut self, cents: i64) {
        if cents < 0 {
            self.push(b'-');
        }
        let c = cents.unsigned_abs();
        self.u(c / 100);
        self.push(b'.');
        self.pad(c % 100, 2);
    }

    fn coord(&mut self, x: f64) {
        let v = (x * 10_000.0).round() as i64;
        if v < 0 {
            self.push(b'-');
        }
        let v = v.unsigned_abs();
        self.u(v / 10_000);
        self.push(b'.');
        self.pad(v % 10_000, 4);
    }

    fn hex(&mut self, x: u64) {
        let mut buf = [0u8; 16];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = HEX[(x >> (60 - 4 * i) & 0xf) as usize];
        }
        self.extend_from_slice(&buf);
    }

    fn ip(&mut self, ip: u32) {
        self.u((ip >> 24) as u64);
        self.push(b'.');
        self.u((ip >> 16 & 0xff) as u64);
        self.push(b'.');
        self.u((ip >> 8 & 0xff) as u64);
        self.push(b'.');
        self.u((ip & 0xff) as u64);
    }
}

/// `n` as exactly `W` decimal digits (zero-padded; higher digits dropped).
#[inline(always)]
fn fixed<const W: usize>(out: &mut Vec<u8>, mut n: u64) {
    let mut b = [b'0'; W];
    let mut i = W;
    while i >= 2 {
        let r = (n % 100) as usize * 2;
        n /= 100;
        b[i - 2] = DIGITS2[r];
        b[i - 1] = DIGITS2[r + 1];
        i -= 2;
    }
    if i == 1 {
        b[0] = b'0' + (n % 10) as u8;
    }
    out.extend_from_slice(&b);
}

fn put_hex_trimmed(out: &mut Vec<u8>, x: u64) {
    let digits = (64 - x.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(HEX[(x >> (4 * i) & 0xf) as usize]);
    }
}

/// A UTC calendar time.
struct Civil {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
    milli: i64,
}

fn civil(ms: i64) -> Civil {
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
    Civil {
        year: if m <= 2 { y + 1 } else { y },
        month: m,
        day: d,
        hour: sod / 3600,
        minute: (sod / 60) % 60,
        second: sod % 60,
        milli,
    }
}

/// Write epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (no allocation, no time zone lookup;
/// years 0 ..= 9999).
pub fn write_rfc3339_ms(out: &mut Vec<u8>, ms: i64) {
    let t = civil(ms);
    fixed::<4>(out, t.year.clamp(0, 9999) as u64);
    out.push(b'-');
    fixed::<2>(out, t.month as u64);
    out.push(b'-');
    fixed::<2>(out, t.day as u64);
    out.push(b'T');
    fixed::<2>(out, t.hour as u64);
    out.push(b':');
    fixed::<2>(out, t.minute as u64);
    out.push(b':');
    fixed::<2>(out, t.second as u64);
    out.push(b'.');
    fixed::<3>(out, t.milli as u64);
    out.push(b'Z');
}

/// The calendar part of the current simulated hour, formatted once per hour.
#[derive(Debug, Clone)]
struct HourCache {
    start_ms: i64,
    /// `YYYY-MM-DDTHH:`
    rfc3339: [u8; 14],
    /// `yyyyMMddHH`
    compact: [u8; 10],
}

impl HourCache {
    fn new() -> Self {
        Self {
            start_ms: i64::MIN,
            rfc3339: [0; 14],
            compact: [0; 10],
        }
    }

    fn refresh(&mut self, ms: i64) {
        if ms >= self.start_ms && ms.saturating_sub(self.start_ms) < HOUR_MS {
            return;
        }
        self.start_ms = ms.div_euclid(HOUR_MS) * HOUR_MS;
        let t = civil(self.start_ms);
        let mut v = Vec::with_capacity(24);
        write_rfc3339_ms(&mut v, self.start_ms);
        self.rfc3339.copy_from_slice(&v[..14]);
        v.clear();
        fixed::<4>(&mut v, t.year.clamp(0, 9999) as u64);
        fixed::<2>(&mut v, t.month as u64);
        fixed::<2>(&mut v, t.day as u64);
        fixed::<2>(&mut v, t.hour as u64);
        self.compact.copy_from_slice(&v);
    }

    /// `ms` (within the cached hour) as RFC 3339.
    #[inline]
    fn rfc3339(&self, out: &mut Vec<u8>, ms: i64) {
        let within = (ms - self.start_ms) as u64;
        out.extend_from_slice(&self.rfc3339);
        fixed::<2>(out, within / 60_000);
        out.push(b':');
        fixed::<2>(out, within / 1000 % 60);
        out.push(b'.');
        fixed::<3>(out, within % 1000);
        out.push(b'Z');
    }

    /// `ms` (within the cached hour) as `yyyyMMddHHmm`.
    #[inline]
    fn compact(&self, out: &mut Vec<u8>, ms: i64) {
        out.extend_from_slice(&self.compact);
        fixed::<2>(out, (ms - self.start_ms) as u64 / 60_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> crate::config::Config {
        let text = include_str!("../../config.toml");
        toml::from_str::<crate::config::Config>(text).unwrap()
    }

    fn sources() -> Vec<SourceConfig> {
        config().sources
    }

    fn only(shapes: &[&str]) -> Vec<SourceConfig> {
        let mut s = sources();
        for src in &mut s {
            if !shapes.contains(&src.simulator.as_str()) {
                src.simulator.clear();
            }
        }
        s
    }

    #[test]
    fn shapes_and_scenarios_round_trip_their_names() {
        for s in Shape::ALL {
            assert_eq!(Shape::from_name(s.name()), Some(s));
        }
        assert_eq!(SHAPES.len(), Shape::ALL.len());
        for s in Scenario::ALL {
            assert_eq!(Scenario::from_name(s.name()), Some(s));
        }
        assert_eq!(Shape::from_name("cheque"), None);
    }

    #[test]
    fn same_seed_same_bytes_and_valid_json() {
        let cfg = SimulatorConfig::default();
        let mut a = Simulator::new(&cfg, &sources(), 7, 100.0).unwrap();
        let mut b = Simulator::new(&cfg, &sources(), 7, 100.0).unwrap();
        let mut c = Simulator::new(&cfg, &sources(), 8, 100.0).unwrap();
        let mut differs = false;
        let mut last = 0;
        for _ in 0..5000 {
            let (x, y, z) = (a.next_message(), b.next_message(), c.next_message());
            assert_eq!(x, y);
            differs |= x.value != z.value;
            let v: serde_json::Value = serde_json::from_slice(&x.value).unwrap();
            assert_eq!(v["is_fraud"].as_bool(), Some(x.is_fraud));
            assert_eq!(v["fraud_scenario"].as_str(), x.scenario.map(Scenario::name));
            assert!(x.event_time_ms >= last);
            last = x.event_time_ms;
        }
        assert!(differs);
    }

    #[test]
    fn every_shape_writes_the_fields_its_source_declares_and_keys_by_its_entity() {
        let cfg = SimulatorConfig::default();
        let srcs = sources();
        let mut sim = Simulator::new(&cfg, &srcs, 3, 0.0).unwrap();
        let mut seen = [0usize; 4];
        for _ in 0..20_000 {
            let g = sim.next_message();
            let src = &srcs[g.source];
            let shape = Shape::from_name(&src.simulator).unwrap();
            seen[shape as usize] += 1;
            let v: serde_json::Value = serde_json::from_slice(&g.value).unwrap();
            let obj = v.as_object().unwrap();
            for f in &src.fields {
                if f.required {
                    assert!(
                        !obj[&f.name].is_null(),
                        "{} lacks {}: {v}",
                        src.name,
                        f.name
                    );
                }
            }
            // No field outside the declared ones, except the labels (and the boleto line).
            for k in obj.keys() {
                assert!(
                    src.fields.iter().any(|f| &f.name == k)
                        || k == "is_fraud"
                        || k == "fraud_scenario",
                    "{}: undeclared field {k}",
                    src.name
                );
            }
            let time = match shape {
                Shape::Card => v["ts"].as_str(),
                Shape::Pix => v["created_at"].as_str(),
                Shape::Wallet => v["created"].as_str(),
                Shape::Transfer => None,
            }
            .map_or_else(
                || v["requested_at"].as_i64().unwrap(),
                |s| {
                    chrono::DateTime::parse_from_rfc3339(s)
                        .unwrap()
                        .timestamp_millis()
                },
            );
            assert_eq!(time, g.event_time_ms, "{v}");
            if shape == Shape::Pix {
                // E + ISPB + yyyyMMddHHmm of the payment + 11 characters.
                let e2e = v["end_to_end_id"].as_str().unwrap();
                let t = chrono::DateTime::from_timestamp_millis(g.event_time_ms).unwrap();
                assert_eq!(e2e.len(), 32);
                assert_eq!(&e2e[1..9], v["payer_ispb"].as_str().unwrap());
                assert_eq!(&e2e[9..21], t.format("%Y%m%d%H%M").to_string());
            }
            let key = String::from_utf8(g.key).unwrap();
            let expect = match shape {
                Shape::Card => v["pan_token"].as_str().unwrap().to_string(),
                Shape::Pix => v["payer_key"].as_str().unwrap().to_string(),
                Shape::Wallet => v["wallet_id"].as_str().unwrap().to_string(),
                Shape::Transfer => format!(
                    "{}-{}-{}",
                    v["debtor_ispb"].as_str().unwrap(),
                    v["debtor_branch"].as_str().unwrap(),
                    v["debtor_account"].as_str().unwrap()
                ),
            };
            assert_eq!(key, expect);
        }
        // Cards lead, then PIX; wallets and transfers are rarer but present.
        assert!(
            seen[0] > seen[1] && seen[1] > seen[2] && seen[2] > 0 && seen[3] > 0,
            "{seen:?}"
        );
    }

    #[test]
    fn only_configured_shapes_are_generated() {
        let cfg = SimulatorConfig::default();
        let srcs = only(&["card"]);
        let mut sim = Simulator::new(&cfg, &srcs, 1, 0.0).unwrap();
        for _ in 0..20_000 {
            let g = sim.next_message();
            assert_eq!(g.source, 0);
            // Scenarios that need PIX or transfers are off.
            assert!(!matches!(
                g.scenario,
                Some(Scenario::AccountTakeover | Scenario::MuleAccount)
            ));
        }
        let srcs = only(&["wallet"]);
        let mut sim = Simulator::new(&cfg, &srcs, 1, 0.0).unwrap();
        let wallet = srcs.iter().position(|s| s.simulator == "wallet").unwrap();
        assert!((0..5000).all(|_| sim.next_message().source == wallet));
        assert!(matches!(
            Simulator::new(&cfg, &only(&[]), 1, 0.0),
            Err(SimulatorError::NoShapes)
        ));
    }

    #[test]
    fn labels_feedback_does_not_change_the_transactions() {
        let cfg = SimulatorConfig {
            fraud_rate: 0.05,
            ..Default::default()
        };
        let on = SimulatorParams {
            label_feedback: true,
            ..Default::default()
        };
        let mut a = Simulator::new(&cfg, &sources(), 5, 0.0).unwrap();
        let mut b = Simulator::with_params(&cfg, &sources(), 5, 0.0, on).unwrap();
        let mut buf = Vec::new();
        let mut labels = 0;
        for _ in 0..50_000 {
            assert_eq!(a.next_message(), b.next_message());
            while b.next_label_into(&mut buf).is_some() {
                labels += 1;
            }
            assert_eq!(a.next_label_into(&mut buf), None);
        }
        assert!(labels > 0 || b.pending_labels() > 0);
    }

    #[test]
    fn nights_are_quieter_than_evenings_and_sundays_than_fridays() {
        let cfg = SimulatorConfig::default();
        let mut sim = Simulator::new(&cfg, &sources(), 11, 0.0).unwrap();
        let mut by_hour = [0u32; 168];
        let end = sim.clock_ms() + 14 * DAY_MS;
        while sim.clock_ms() < end {
            let m = sim.next_into(&mut Vec::new());
            let h = (m.event_time_ms + LOCAL_OFFSET_MS).div_euclid(HOUR_MS);
            let wd = ((h.div_euclid(24) + 3).rem_euclid(7) * 24 + h.rem_euclid(24)) as usize;
            by_hour[wd] += 1;
        }
        let hour = |h: usize| (0..7).map(|d| by_hour[d * 24 + h]).sum::<u32>();
        assert!(
            hour(3) * 5 < hour(19),
            "03h {} vs 19h {}",
            hour(3),
            hour(19)
        );
        let day = |d: usize| by_hour[d * 24..d * 24 + 24].iter().sum::<u32>();
        assert!(day(6) < day(4), "Sunday {} vs Friday {}", day(6), day(4));
        // Weekend mornings start later than weekday mornings.
        assert!(by_hour[5 * 24 + 7] < by_hour[2 * 24 + 7]);
    }

    #[test]
    fn amounts_are_heavy_tailed_and_currencies_vary() {
        let cfg = SimulatorConfig::default();
        let mut sim = Simulator::new(&cfg, &only(&["card"]), 2, 0.0).unwrap();
        let mut brl = Vec::new();
        let mut currencies = std::collections::BTreeSet::new();
        for _ in 0..50_000 {
            let g = sim.next_message();
            let v: serde_json::Value = serde_json::from_slice(&g.value).unwrap();
            let cur = v["currency"].as_str().unwrap().to_string();
            if cur == "BRL" && !g.is_fraud {
                brl.push(v["amount"].as_str().unwrap().parse::<f64>().unwrap());
            }
            currencies.insert(cur);
        }
        brl.sort_by(f64::total_cmp);
        let q = |p: f64| brl[(p * (brl.len() - 1) as f64) as usize];
        let (median, p999, max) = (q(0.5), q(0.999), q(1.0));
        assert!((20.0..200.0).contains(&median), "median {median}");
        assert!(p999 > 40.0 * median, "p99.9 {p999} vs median {median}");
        assert!(max > 200.0 * median, "max {max} vs median {median}");
        assert!(
            currencies.contains("USD") && currencies.contains("EUR"),
            "{currencies:?}"
        );
    }

    #[test]
    fn natural_rate_follows_the_population() {
        let mut cfg = SimulatorConfig::default();
        let sim = Simulator::new(&cfg, &sources(), 1, 0.0).unwrap();
        let per_day = sim.natural_tps() * 86_400.0 / cfg.customers as f64;
        assert!((2.7..3.3).contains(&per_day), "{per_day}");
        assert_eq!(sim.simulated_tps(), sim.natural_tps());
        cfg.customers *= 2;
        let big = Simulator::new(&cfg, &sources(), 1, 0.0).unwrap();
        assert!(big.natural_tps() > 1.8 * sim.natural_tps());
        let fixed = Simulator::new(&cfg, &sources(), 1, 50.0).unwrap();
        assert!((fixed.simulated_tps() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn formatting_helpers_write_what_format_would() {
        let mut out = Vec::new();
        for n in [0u64, 7, 42, 100, 999, 1_000_000, u64::MAX] {
            out.clear();
            out.u(n);
            assert_eq!(out, n.to_string().as_bytes());
            out.clear();
            out.pad(n, 8);
            assert_eq!(out, format!("{n:08}").as_bytes());
        }
        for (c, s) in [
            (0, "0.00"),
            (5, "0.05"),
            (123_456, "1234.56"),
            (-250, "-2.50"),
        ] {
            out.clear();
            out.cents(c);
            assert_eq!(out, s.as_bytes());
        }
        for (x, s) in [
            (-23.55051, "-23.5505"),
            (0.00004, "0.0000"),
            (151.2, "151.2000"),
        ] {
            out.clear();
            out.coord(x);
            assert_eq!(out, s.as_bytes());
        }
        out.clear();
        out.ip(0xb1_02_03_04);
        assert_eq!(out, b"177.2.3.4");
        assert_eq!(ip_country("177.2.3.4"), Some("BR"));
        assert_eq!(ip_country("185.1.1.1"), Some("NL"));
        assert_eq!(ip_country("10.0.0.1"), None);
        out.clear();
        put_hex_trimmed(&mut out, 42);
        assert_eq!(out, b"2a");
    }

    #[test]
    fn timestamps_format_like_chrono() {
        for ms in [
            0_i64,
            1_767_225_600_123,
            951_782_400_000,
            4_102_444_799_999,
            1_709_164_800_001,
        ] {
            let mut out = Vec::new();
            write_rfc3339_ms(&mut out, ms);
            let expect = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expect);
        }
    }

    #[test]
    fn a_customer_is_three_cache_lines_with_the_hot_fields_in_the_first_two() {
        assert_eq!(std::mem::size_of::<Customer>(), 192);
        assert_eq!(std::mem::align_of::<Customer>(), 64);
        assert!(std::mem::offset_of!(Customer, amount_sigma) < 64);
        assert!((64..128).contains(&std::mem::offset_of!(Customer, first_card)));
        assert!(std::mem::offset_of!(Customer, favourites) + 4 * MAX_FAV <= 128);
        assert!(std::mem::offset_of!(Customer, contacts) >= 128);
    }

    #[test]
    fn alias_table_draws_in_proportion() {
        let (prob, alias) = alias_table(&[1.0, 3.0, 0.0, 4.0]);
        // Expected mass of each outcome from the table.
        let mut mass = [0.0f64; 4];
        for i in 0..4 {
            mass[i] += prob[i] as f64 / 4.0;
            mass[alias[i] as usize] += (1.0 - prob[i] as f64) / 4.0;
        }
        for (m, w) in mass.iter().zip([0.125, 0.375, 0.0, 0.5]) {
            assert!((m - w).abs() < 1e-6, "{mass:?}");
        }
    }
}
