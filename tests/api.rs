//! The HTTP API against the real Kafka broker and PostgreSQL (`payguard run`), and in the demo
//! (`payguard demo`, memory store): scoring against the live history, alerts with paging and as
//! Server-Sent Events, transactions, labels, health, OpenAPI, auth and malformed requests.

mod common;

use std::time::Duration;

use common::TestEnv;
use serde_json::{Value, json};
use sqlx::Row;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "test-key-0123456789abcdef";

/// One HTTP/1.1 exchange (`Connection: close`): status and body.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    if let Some(b) = body {
        // A server refusing a large body may close before reading all of it.
        let _ = s.write_all(b).await;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

struct Api {
    addr: String,
    auth: Vec<(&'static str, String)>,
}

impl Api {
    fn headers(&self) -> Vec<(&str, &str)> {
        self.auth.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (st, body) = http(&self.addr, "GET", path, &self.headers(), None).await;
        (st, json_of(&body))
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let b = body.to_string();
        let (st, body) = http(
            &self.addr,
            "POST",
            path,
            &self.headers(),
            Some(b.as_bytes()),
        )
        .await;
        (st, json_of(&body))
    }

    async fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let (st, body) = http(&self.addr, "POST", path, &self.headers(), Some(body)).await;
        (st, json_of(&body))
    }
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()))
}

/// The API address a spawned process logged.
async fn api_addr(env: &TestEnv, child: &std::process::Child) -> String {
    let log_path =
        std::fs::read_to_string(env.dir.path().join(format!("pid-{}", child.id()))).unwrap();
    for _ in 0..600 {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(a) = log.lines().find_map(|l| l.split("addr=").nth(1)) {
            return a.trim().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no API address in the log: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
}

fn assert_error(status: u16, body: &Value, want: u16, contains: &str) {
    assert_eq!(status, want, "{body}");
    let e = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no JSON error in {body}"));
    assert!(
        e.to_lowercase().contains(&contains.to_lowercase()),
        "error {e:?} should mention {contains:?}"
    );
}

fn canonical(id: &str, card: &str, time: &str, amount: &str) -> Value {
    json!({
        "transaction_id": id,
        "event_time": time,
        "source": "card",
        "amount": amount,
        "currency": "BRL",
        "customer_id": format!("cus_{card}"),
        "card_id": card,
        "merchant_id": "mer_api",
        "channel": "ecommerce",
    })
}

fn feature(result: &Value, name: &str) -> i64 {
    result["features"][name]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer feature {name} in {result}"))
}

#[tokio::test]
async fn api_against_kafka_and_postgres() {
    let env = TestEnv::new("api", |t| {
        // The decisions asserted below are the rules' (card testing); the model would decline the
        // burst outright.
        t.remove("model");
        let api = t["api"].as_table_mut().unwrap();
        api.insert("api_keys".into(), toml::Value::Array(vec![KEY.into()]));
        api.insert("max_body_bytes".into(), 65536.into());
        // Debug builds on a shared machine: give the engine time.
        api.insert("score_timeout_ms".into(), 30000.into());
        t["pipeline"]
            .as_table_mut()
            .unwrap()
            .insert("batch_max_wait_ms".into(), 20.into());
    })
    .await;
    env.generate(3_000, &[]);
    let run = env.spawn(&["run"]);
    env.wait_for("the generated rows", Duration::from_secs(120), || async {
        env.transactions().await >= 3_000
    })
    .await;
    let addr = api_addr(&env, &run).await;
    let open = Api {
        addr: addr.clone(),
        auth: vec![],
    };
    let api = Api {
        addr: addr.clone(),
        auth: vec![("Authorization", format!("Bearer {KEY}"))],
    };

    // Open endpoints; health.
    let (st, live) = open.get("/health/live").await;
    assert_eq!((st, live["status"].as_str()), (200, Some("live")));
    let (st, ready) = open.get("/health/ready").await;
    assert_eq!(st, 200, "{ready}");
    assert_eq!(ready["database"]["status"], "ok", "{ready}");
    assert_eq!(ready["broker"]["status"], "ok", "{ready}");
    assert_eq!(ready["sql"]["status"], "ok", "{ready}");
    assert!(ready["lag"].is_i64(), "{ready}");
    let (st, doc) = open.get("/openapi.json").await;
    assert_eq!(st, 200);
    assert!(doc["paths"]["/v1/score"]["post"].is_object(), "{doc}");
    let (st, body) = http(&addr, "GET", "/metrics", &[], None).await;
    assert_eq!(st, 200);
    assert!(body.contains("payguard_"), "{body}");
    let (st, body) = open.get("/no/such/thing").await;
    assert_error(st, &body, 404, "no such endpoint");

    // Auth: missing, wrong, X-API-Key.
    let (st, body) = open.get("/v1/alerts").await;
    assert_error(st, &body, 401, "API key required");
    let wrong = Api {
        addr: addr.clone(),
        auth: vec![("Authorization", format!("Bearer {KEY}x"))],
    };
    let (st, body) = wrong.get("/v1/alerts").await;
    assert_error(st, &body, 401, "invalid API key");
    let (st, body) = wrong.post("/v1/score", &json!({"record": false})).await;
    assert_error(st, &body, 401, "invalid API key");
    let header_key = Api {
        addr: addr.clone(),
        auth: vec![("X-API-Key", KEY.to_string())],
    };
    let (st, _) = header_key.get("/v1/stats").await;
    assert_eq!(st, 200);

    // Alerts: paging through all of them gives exactly the alerts table, newest first.
    let stored_alerts = env.scalar("SELECT count(*) FROM alerts").await;
    assert!(stored_alerts > 0, "the generated traffic raises alerts");
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/alerts?limit=7&cursor={c}"),
            None => "/v1/alerts?limit=7".to_string(),
        };
        let (st, page) = api.get(&path).await;
        assert_eq!(st, 200, "{page}");
        for a in page["alerts"].as_array().unwrap() {
            assert_ne!(a["decision"], "approve");
            assert!(
                a["amount"].is_string(),
                "amounts are exact decimal strings: {a}"
            );
            seen.push((
                a["event_time"].as_str().unwrap().to_string(),
                a["transaction_id"].as_str().unwrap().to_string(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len() as i64, stored_alerts);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, no repeats across pages");
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len());
    let reviews = env
        .scalar("SELECT count(*) FROM alerts WHERE decision = 'review'")
        .await;
    let (st, page) = api.get("/v1/alerts?decision=review&limit=1000").await;
    assert_eq!(st, 200);
    let listed = page["alerts"].as_array().unwrap();
    assert_eq!(listed.len() as i64, reviews.min(1000));
    assert!(listed.iter().all(|a| a["decision"] == "review"));
    let (st, page) = api
        .get("/v1/alerts?source=card&from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&limit=1")
        .await;
    assert_eq!(st, 200);
    assert_eq!(page["alerts"].as_array().unwrap().len(), 1);
    let (st, page) = api.get("/v1/alerts?source=nosuch").await;
    assert_eq!((st, page["alerts"].as_array().unwrap().len()), (200, 0));
    for (q, why) in [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("decision=approve", "decision"),
        ("cursor=zzz", "cursor"),
        ("from=yesterday", "from"),
        ("colour=red", "colour"),
    ] {
        let (st, body) = api.get(&format!("/v1/alerts?{q}")).await;
        assert_error(st, &body, 400, why);
    }

    // One transaction, with its decision and features.
    let alert_id = seen[0].1.clone();
    let (st, t) = api.get(&format!("/v1/transactions/{alert_id}")).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["transaction_id"], alert_id.as_str());
    assert_ne!(t["decision"], "approve");
    assert!(t["features"].is_object(), "{t}");
    let (st, body) = api.get("/v1/transactions/no-such-id").await;
    assert_error(st, &body, 404, "no transaction");

    // Scoring against the live history: a card of the stream, one second after its last use.
    let mut db = env.db().await;
    let row = sqlx::query(
        "SELECT card_id, max(event_time) AS last FROM transactions WHERE card_id IS NOT NULL \
         GROUP BY card_id ORDER BY count(*) DESC, card_id LIMIT 1",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    let card: String = row.get(0);
    let last: chrono::DateTime<chrono::Utc> = row.get(1);
    let at = last + chrono::Duration::seconds(1);
    let in_window: i64 = sqlx::query(
        "SELECT count(*) FROM transactions WHERE card_id = $1 AND event_time >= $2 - interval '1 hour'",
    )
    .bind(&card)
    .bind(at)
    .fetch_one(&mut db)
    .await
    .unwrap()
    .get(0);
    let at_text = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let probe = canonical("api-probe-1", &card, &at_text, "12.34");
    let before = env.transactions().await;
    let (st, scored) = api
        .post("/v1/score", &json!({"record": false, "transaction": probe}))
        .await;
    assert_eq!(st, 200, "{scored}");
    assert_eq!(scored["recorded"], false);
    let r = &scored["results"][0];
    assert_eq!(r["transaction_id"], "api-probe-1");
    assert_eq!(
        feature(r, "card_tx_1h"),
        in_window + 1,
        "the card's stream history in the hour before, and the transaction itself: {r}"
    );
    assert!(["approve", "review", "decline"].contains(&r["decision"].as_str().unwrap()));
    assert!(r["rule_hits"].is_array());
    assert!(r.get("model_version").is_some() && r.get("score").is_some());
    assert_eq!(r["transaction"]["amount"], "12.34");
    // Not recorded: the same again gives the same, and nothing was stored.
    let (st, again) = api
        .post("/v1/score", &json!({"record": false, "transaction": probe}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(again["results"][0]["features"], r["features"]);
    let (st, _) = api.get("/v1/transactions/api-probe-1").await;
    assert_eq!(st, 404);

    // A batch: later transactions see the earlier ones of the request.
    let fresh = "api-card-fresh";
    let (st, batch) = api
        .post(
            "/v1/score",
            &json!({"record": false, "transactions": [
                canonical("api-b1", fresh, &at_text, "1.00"),
                canonical("api-b2", fresh, &at_text, "2.00"),
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{batch}");
    assert_eq!(feature(&batch["results"][0], "card_tx_1h"), 1);
    assert_eq!(feature(&batch["results"][1], "card_tx_1h"), 2);

    // In a source's own format (query or body), through the source's decoder and mapping SQL.
    let raw = json!({"auth_id": "api-raw-1", "ts": at_text, "pan_token": card,
        "merchant_id": "mer_api", "amount": "5.50", "currency": "brl", "entry_mode": "chip"});
    for (path, body) in [
        (
            "/v1/score?source=card",
            json!({"record": false, "transaction": raw}),
        ),
        (
            "/v1/score",
            json!({"record": false, "source": "card", "transaction": raw}),
        ),
    ] {
        let (st, s) = api.post(path, &body).await;
        assert_eq!(st, 200, "{s}");
        let r = &s["results"][0];
        assert_eq!(r["transaction_id"], "api-raw-1");
        assert_eq!(
            r["transaction"]["currency"], "BRL",
            "the mapping SQL ran: {r}"
        );
        assert_eq!(feature(r, "card_tx_1h"), in_window + 1);
        // The source's own signal, mapped to its attribute, is returned and made a feature.
        assert_eq!(r["transaction"]["entry_mode"], "chip", "{r}");
        assert_eq!(r["features"]["txn_entry_mode"], "chip", "{r}");
    }

    // Canonical format with attributes: accepted beside the canonical columns, returned in
    // `transaction`, seen by the features; an attribute of the wrong type is a 422 naming it.
    let mut with_attributes = canonical("api-attr-1", "api-card-attr", &at_text, "3.00");
    with_attributes["cvv_result"] = json!("N");
    with_attributes["response_code"] = json!("05");
    let (st, s) = api
        .post(
            "/v1/score",
            &json!({"record": false, "transaction": with_attributes}),
        )
        .await;
    assert_eq!(st, 200, "{s}");
    let a = &s["results"][0];
    assert_eq!(a["transaction"]["cvv_result"], "N", "{a}");
    assert_eq!(a["transaction"]["pix_initiation"], Value::Null, "{a}");
    assert_eq!(a["features"]["txn_response_code"], "05", "{a}");
    assert_eq!(feature(a, "card_cvv_mismatches_24h"), 1, "{a}");
    assert_eq!(feature(a, "card_declines_1h"), 1, "{a}");
    let mut wrong = with_attributes.clone();
    wrong["cvv_result"] = json!(7);
    let (st, e) = api
        .post("/v1/score", &json!({"record": false, "transaction": wrong}))
        .await;
    assert_error(st, &e, 422, "cvv_result");

    // Recorded: enters the history and is stored like a streamed transaction.
    let (st, rec) = api
        .post("/v1/score", &json!({"record": true, "transaction": probe}))
        .await;
    assert_eq!(st, 200, "{rec}");
    assert_eq!(rec["recorded"], true);
    assert_eq!(rec["results"][0]["features"], r["features"]);
    env.wait_for(
        "the recorded transaction",
        Duration::from_secs(30),
        || async { env.transactions().await == before + 1 },
    )
    .await;
    let (st, t) = api.get("/v1/transactions/api-probe-1").await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["amount"], "12.34");
    let probe2 = canonical("api-probe-2", &card, &at_text, "12.34");
    let (_, after) = api
        .post(
            "/v1/score",
            &json!({"record": false, "transaction": probe2}),
        )
        .await;
    assert_eq!(
        feature(&after["results"][0], "card_tx_1h"),
        in_window + 2,
        "the recorded transaction is now history"
    );

    // Alerts as Server-Sent Events: a card-testing burst recorded through the API.
    let mut sse = tokio::net::TcpStream::connect(&addr).await.unwrap();
    sse.write_all(
        format!("GET /v1/alerts/stream?decision=review HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {KEY}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 4096];
    let n = sse.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let burst: Vec<Value> = (0..5)
        .map(|i| {
            canonical(
                &format!("api-burst-{i}"),
                "api-card-burst",
                &(at + chrono::Duration::seconds(30 * i)).to_rfc3339(),
                "1.50",
            )
        })
        .collect();
    let (st, b) = api
        .post("/v1/score", &json!({"record": true, "transactions": burst}))
        .await;
    assert_eq!(st, 200, "{b}");
    let decisions: Vec<&str> = b["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        ["approve", "approve", "approve", "review", "review"]
    );
    let mut got = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(got.contains("api-burst-3") && got.contains("api-burst-4")) {
        let mut buf = vec![0u8; 8192];
        let n = tokio::time::timeout_at(deadline, sse.read(&mut buf))
            .await
            .expect("alerts on the event stream")
            .unwrap();
        assert!(n > 0, "stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("event: alert"), "{got}");
    assert!(
        !got.contains("api-burst-2"),
        "approved transactions are no alerts"
    );

    // Labels.
    let (st, l) = api
        .post(
            "/v1/labels",
            &json!({"transaction_id": "api-probe-1", "label": "fraud", "report_type": "chargeback"}),
        )
        .await;
    assert_eq!(st, 201, "{l}");
    assert_eq!(
        (l["stored"].as_bool(), l["transaction_known"].as_bool()),
        (Some(true), Some(true))
    );
    let (st, l) = api
        .post(
            "/v1/labels",
            &json!({"transaction_id": "api-probe-1", "label": "genuine"}),
        )
        .await;
    assert_eq!(
        (st, l["stored"].as_bool()),
        (200, Some(false)),
        "first report wins"
    );
    let row = sqlx::query("SELECT label, report_type, source, transaction_time IS NOT NULL FROM labels WHERE transaction_id = 'api-probe-1'")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>(0), "fraud");
    assert_eq!(
        row.get::<Option<String>, _>(1).as_deref(),
        Some("chargeback")
    );
    assert_eq!(row.get::<Option<String>, _>(2).as_deref(), Some("card"));
    assert!(row.get::<bool, _>(3));
    let (st, t) = api.get("/v1/transactions/api-probe-1").await;
    assert_eq!((st, &t["label"]["label"]), (200, &json!("fraud")), "{t}");
    let (st, l) = api
        .post("/v1/labels", &json!({"transaction_id": "never-seen", "label": "genuine", "reported_at": "2026-11-20T10:00:00Z"}))
        .await;
    assert_eq!(
        (st, l["transaction_known"].as_bool()),
        (201, Some(false)),
        "{l}"
    );
    for (body, want, why) in [
        (
            json!({"transaction_id": "x", "label": "maybe"}),
            422,
            "unknown variant",
        ),
        (json!({"label": "fraud"}), 422, "transaction_id"),
        (
            json!({"transaction_id": "", "label": "fraud"}),
            422,
            "transaction_id",
        ),
        (
            json!({"transaction_id": "x", "label": "fraud", "reported_at": "soon"}),
            422,
            "reported_at",
        ),
        (
            json!({"transaction_id": "x", "label": "fraud", "extra": 1}),
            422,
            "unknown field",
        ),
        (
            json!({"transaction_id": "a\u{0}b", "label": "fraud"}),
            422,
            "NUL",
        ),
    ] {
        let (st, e) = api.post("/v1/labels", &body).await;
        assert_error(st, &e, want, why);
    }

    // Malformed scoring requests: 4xx with what is wrong, nothing stored.
    let stored = env.transactions().await;
    let good = canonical("api-bad", "c", &at_text, "1.00");
    let mut no_amount = good.clone();
    no_amount.as_object_mut().unwrap().remove("amount");
    let mut typo = good.clone();
    typo.as_object_mut()
        .unwrap()
        .insert("amout".into(), json!("1.00"));
    let mut future = good.clone();
    future["event_time"] = json!("2999-01-01T00:00:00Z");
    let mut wrong_type = good.clone();
    wrong_type["amount"] = json!({"value": 1});
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"transaction": good}), 422, "missing field `record`"),
        (
            json!({"record": "yes", "transaction": good}),
            422,
            "invalid type",
        ),
        (json!({"record": false}), 422, "missing `transaction`"),
        (json!({"record": false, "transactions": []}), 422, "empty"),
        (
            json!({"record": false, "transaction": good, "transactions": [good]}),
            422,
            "not both",
        ),
        (
            json!({"record": false, "transaction": 5}),
            422,
            "not a JSON object",
        ),
        (
            json!({"record": true, "transaction": no_amount}),
            422,
            "amount",
        ),
        (
            json!({"record": true, "transaction": typo}),
            422,
            "unknown column",
        ),
        (
            json!({"record": true, "transaction": future}),
            422,
            "future",
        ),
        (
            json!({"record": true, "transaction": wrong_type}),
            422,
            "transaction 0",
        ),
        (
            json!({"record": true, "source": "nosuch", "transaction": raw}),
            422,
            "unknown source",
        ),
        (
            json!({"record": true, "source": "card", "transaction": {"auth_id": "x"}}),
            422,
            "missing required field",
        ),
        (
            json!({"record": true, "colour": 1, "transaction": good}),
            422,
            "unknown field",
        ),
        (
            json!({"record": true, "transaction": canonical("a\u{0}", "c", &at_text, "1")}),
            422,
            "NUL",
        ),
    ];
    for (body, want, why) in cases {
        let (st, e) = api.post("/v1/score", &body).await;
        assert_error(st, &e, want, why);
    }
    let (st, e) = api
        .post(
            "/v1/score?source=pix",
            &json!({"record": false, "source": "card", "transaction": raw}),
        )
        .await;
    assert_error(st, &e, 422, "differ");
    let (st, e) = api.post_raw("/v1/score", b"{\"record\": fals").await;
    assert_error(st, &e, 400, "malformed JSON");
    let (st, e) = api.post_raw("/v1/score", b"").await;
    assert_error(st, &e, 400, "malformed JSON");
    let big = format!(
        "{{\"record\": false, \"transaction\": {{\"transaction_id\": \"{}\"}}}}",
        "x".repeat(70_000)
    );
    let (st, e) = api.post_raw("/v1/score", big.as_bytes()).await;
    assert_error(st, &e, 413, "too large");
    let (st, e) = api.get("/v1/score").await;
    assert_error(st, &e, 405, "method not allowed");
    assert_eq!(
        env.transactions().await,
        stored,
        "no bad request stored anything"
    );

    common::signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn demo_serves_the_page_and_scores_against_the_simulated_stream() {
    let env = TestEnv::new("api_demo", |t| {
        t["api"]
            .as_table_mut()
            .unwrap()
            .insert("score_timeout_ms".into(), 30000.into());
    })
    .await;
    let demo = env.spawn(&["demo", "--listen", "127.0.0.1:0", "--rate", "500"]);
    let addr = api_addr(&env, &demo).await;
    let api = Api {
        addr: addr.clone(),
        auth: vec![],
    };
    let (st, page) = http(&addr, "GET", "/", &[], None).await;
    assert_eq!(st, 200);
    assert!(page.contains("<title>Payguard"), "{page}");
    assert!(page.contains("/v1/stats") && page.contains("/v1/alerts"));
    env.wait_for(
        "alerts in the memory store",
        Duration::from_secs(90),
        || async {
            let (st, p) = api.get("/v1/alerts?limit=5").await;
            st == 200 && !p["alerts"].as_array().unwrap().is_empty()
        },
    )
    .await;
    let (_, p) = api.get("/v1/alerts?limit=5").await;
    let a = &p["alerts"][0];
    let id = a["transaction_id"].as_str().unwrap();
    let (st, t) = api.get(&format!("/v1/transactions/{id}")).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["decision"], a["decision"]);
    let (st, stats) = api.get("/v1/stats").await;
    assert_eq!(st, 200);
    assert!(
        stats["memory_store"]["transactions"].as_u64().unwrap() > 0,
        "{stats}"
    );
    // Scoring against the simulator's live history, recorded into the memory store.
    let card = t["card_id"].as_str().unwrap_or("card-x").to_string();
    let time = t["event_time"].as_str().unwrap().to_string();
    let tx = canonical("demo-probe", &card, &time, "3.00");
    let (st, s) = api
        .post("/v1/score", &json!({"record": false, "transaction": tx}))
        .await;
    assert_eq!(st, 200, "{s}");
    assert!(feature(&s["results"][0], "card_tx_24h") >= 1);
    let (st, s) = api
        .post("/v1/score", &json!({"record": true, "transaction": tx}))
        .await;
    assert_eq!(st, 200, "{s}");
    env.wait_for(
        "the recorded transaction",
        Duration::from_secs(30),
        || async { api.get("/v1/transactions/demo-probe").await.0 == 200 },
    )
    .await;
    let (st, l) = api
        .post(
            "/v1/labels",
            &json!({"transaction_id": "demo-probe", "label": "fraud"}),
        )
        .await;
    assert_eq!(
        (st, l["transaction_known"].as_bool()),
        (201, Some(true)),
        "{l}"
    );
    let (st, t) = api.get("/v1/transactions/demo-probe").await;
    assert_eq!((st, &t["label"]["label"]), (200, &json!("fraud")));
    common::signal(&demo, "INT");
    let (status, log) = env.wait(demo, Duration::from_secs(30));
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_labels_reach_the_running_engine() {
    // The label rule of tests/label_feedback.rs, on top of the shipped rules.
    let rules = common::rules_with_card_fraud_label_rule();
    let env = TestEnv::new("api_labels", |t| {
        t.remove("model");
        t["labels"]
            .as_table_mut()
            .unwrap()
            .insert("enabled".into(), true.into());
        let engine = t["engine"].as_table_mut().unwrap();
        engine.insert("rules".into(), rules.path().display().to_string().into());
        engine.insert("hot_reload".into(), false.into());
        t["api"]
            .as_table_mut()
            .unwrap()
            .insert("score_timeout_ms".into(), 30000.into());
        t["pipeline"]
            .as_table_mut()
            .unwrap()
            .insert("batch_max_wait_ms".into(), 20.into());
    })
    .await;
    let start = chrono::Utc::now();
    let at = |minutes_ago: i64| (start - chrono::Duration::minutes(minutes_ago)).to_rfc3339();
    let message = |id: &str, minutes_ago: i64| {
        format!(
            r#"{{"auth_id":"{id}","ts":"{}","pan_token":"card-lab","customer_ref":"cus-lab","merchant_id":"m-{id}","amount":"42.10","currency":"BRL","entry_mode":"ecommerce"}}"#,
            at(minutes_ago)
        )
    };
    // Transaction A, through Kafka, into the running pipeline (whose label topic must exist:
    // one label of another transaction).
    let a = message("lab-a", 180);
    env.kcat_produce(0, &[a.as_bytes()]);
    let other = format!(
        r#"{{"transaction_id":"unrelated","label":"genuine","reported_at":"{}"}}"#,
        at(200)
    );
    common::kcat_produce_to(&format!("{}.labels", env.topic), 0, &[other.as_bytes()]);
    let run = env.spawn(&["run"]);
    env.wait_for("A stored", Duration::from_secs(120), || async {
        env.transactions().await >= 1
    })
    .await;
    let api = Api {
        addr: api_addr(&env, &run).await,
        auth: vec![],
    };
    let probe = json!({"record": false,
        "transaction": canonical("lab-probe", "card-lab", &at(60), "3.00")});
    let card_fraud = |s: &Value| feature(&s["results"][0], "card_fraud_labels_90d");
    let (st, s) = api.post("/v1/score", &probe).await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(card_fraud(&s), 0, "no label yet: {s}");

    // An analyst marks A as fraud, reported 90 minutes ago (before the probe, after A).
    let (st, l) = api
        .post(
            "/v1/labels",
            &json!({"transaction_id": "lab-a", "label": "fraud", "report_type": "analyst",
                    "reported_at": at(90)}),
        )
        .await;
    assert_eq!(
        (st, l["transaction_known"].as_bool()),
        (201, Some(true)),
        "{l}"
    );
    // The very next evaluation sees it: no restart, no batch in between.
    let (st, s) = api.post("/v1/score", &probe).await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(card_fraud(&s), 1, "the API label reached the engine: {s}");
    assert_eq!(s["results"][0]["decision"], "decline", "{s}");
    // Point in time: an evaluation before the report does not see it.
    let early = json!({"record": false,
        "transaction": canonical("lab-early", "card-lab", &at(120), "3.00")});
    let (st, s) = api.post("/v1/score", &early).await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(card_fraud(&s), 0, "{s}");

    // And a transaction of the card streamed through Kafka after the report.
    let b = message("lab-b", 30);
    env.kcat_produce(0, &[b.as_bytes()]);
    env.wait_for("B stored", Duration::from_secs(60), || async {
        env.transactions().await >= 2
    })
    .await;
    common::signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let mut db = env.db().await;
    let row = sqlx::query(
        "SELECT t.decision, (a.features->>'card_fraud_labels_90d')::bigint \
         FROM transactions t JOIN alerts a USING (transaction_id) WHERE transaction_id = 'lab-b'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(
        (row.get::<String, _>(0), row.get::<i64, _>(1)),
        ("decline".to_string(), 1)
    );
    assert!(
        !log.contains("fell behind POST /v1/labels"),
        "no label was lost: {log}"
    );
}

/// One HTTPS GET with rustls trusting `ca` only; the status line, or the TLS/IO error.
async fn https_get(addr: &str, ca: &std::path::Path, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let port = addr.rsplit(':').next().unwrap();
    let tcp = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_serves_https_with_a_configured_certificate_and_refuses_plaintext() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    common::certs::ca(d, "ca");
    common::certs::ca(d, "other-ca");
    common::certs::signed(d, "ca", "server", "localhost", "DNS:localhost");
    let (cert, key) = (d.join("server.crt"), d.join("server.key"));
    let env = TestEnv::new("api_https", |t| {
        let api = t["api"].as_table_mut().unwrap();
        api.insert("tls_cert_file".into(), cert.display().to_string().into());
        api.insert("tls_key_file".into(), key.display().to_string().into());
    })
    .await;
    let demo = env.spawn(&["demo", "--listen", "127.0.0.1:0", "--rate", "100"]);
    let addr = api_addr(&env, &demo).await;
    let status = https_get(&addr, &d.join("ca.crt"), "/health/live").await;
    assert_eq!(status.as_deref(), Ok("HTTP/1.1 200 OK"), "{status:?}");
    // A client that does not trust the certificate's CA: refused in the handshake.
    let refused = https_get(&addr, &d.join("other-ca.crt"), "/health/live").await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "{refused:?}"
    );
    // Plain HTTP to the HTTPS port gets no HTTP answer; the server keeps serving.
    let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    plain
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let again = https_get(&addr, &d.join("ca.crt"), "/v1/stats").await;
    assert_eq!(again.as_deref(), Ok("HTTP/1.1 200 OK"), "{again:?}");
    common::signal(&demo, "TERM");
    let (status, _) = env.wait(demo, Duration::from_secs(30));
    assert!(status.success());
}
