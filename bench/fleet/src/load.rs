//! The load generator: key writes for a fixed time, and rounds of long-polls answered by a
//! revocation. Plain HTTP/1.1 through reqwest (one connection per request in flight).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::Value;
use tokio::sync::Mutex;

/// Keys a client makes in one account before it moves to the next (the cap is 1,000).
const KEYS_PER_ACCOUNT: usize = 900;

/// An HTTP client keeping up to `connections` idle connections per replica.
pub fn client(connections: usize) -> Result<Client, String> {
    Client::builder()
        .http1_only()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// One request with a Bearer token; the status and the body.
pub async fn call(
    client: &Client,
    method: Method,
    url: &str,
    token: &str,
    body: Option<&'static str>,
    timeout: Duration,
) -> Result<(StatusCode, Vec<u8>), String> {
    let mut req = client
        .request(method.clone(), url)
        .bearer_auth(token)
        .timeout(timeout);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
    Ok((status, bytes.to_vec()))
}

async fn json_call(
    client: &Client,
    method: Method,
    url: &str,
    token: &str,
    body: Option<&'static str>,
    want: StatusCode,
) -> Result<Value, String> {
    let (status, bytes) = call(
        client,
        method.clone(),
        url,
        token,
        body,
        Duration::from_secs(30),
    )
    .await?;
    if status != want {
        return Err(format!(
            "{method} {url}: {status} (wanted {want}): {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{method} {url}: not JSON: {e}"))
}

/// Creates an account (admin token); its SID.
pub async fn create_account(client: &Client, base: &str, admin: &str) -> Result<String, String> {
    let v = json_call(
        client,
        Method::POST,
        &format!("{base}/v1/accounts"),
        admin,
        Some("{}"),
        StatusCode::CREATED,
    )
    .await?;
    v["sid"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "account created without a sid".to_owned())
}

/// Creates `n` accounts, 16 at a time, through `base`.
pub async fn create_accounts(
    client: &Client,
    base: &str,
    admin: &str,
    n: usize,
) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = left.min(16);
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let (c, b, a) = (client.clone(), base.to_owned(), admin.to_owned());
            tasks.push(tokio::spawn(
                async move { create_account(&c, &b, &a).await },
            ));
        }
        for t in tasks {
            out.push(t.await.map_err(|e| format!("task: {e}"))??);
        }
        left -= batch;
    }
    Ok(out)
}

/// Creates a key in `account` (admin token); its SID.
pub async fn create_key(
    client: &Client,
    base: &str,
    admin: &str,
    account: &str,
) -> Result<String, String> {
    let v = json_call(
        client,
        Method::POST,
        &format!("{base}/v1/accounts/{account}/keys"),
        admin,
        Some("{}"),
        StatusCode::CREATED,
    )
    .await?;
    v["sid"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "key created without a sid".to_owned())
}

/// The current config version (`GET /readyz`).
pub async fn version(client: &Client, base: &str) -> Result<u64, String> {
    let (status, bytes) = call(
        client,
        Method::GET,
        &format!("{base}/readyz"),
        "",
        None,
        Duration::from_secs(10),
    )
    .await?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("/readyz: {e}"))?;
    match v["version"].as_u64() {
        Some(n) if status == StatusCode::OK => Ok(n),
        _ => Err(format!("/readyz: {status} {v}")),
    }
}

/// `GET /metrics` (admin token) as text.
pub async fn metrics(client: &Client, base: &str, admin: &str) -> Result<String, String> {
    let (status, bytes) = call(
        client,
        Method::GET,
        &format!("{base}/metrics"),
        admin,
        None,
        Duration::from_secs(30),
    )
    .await?;
    if status != StatusCode::OK {
        return Err(format!("/metrics: {status}"));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The sum of the samples of `name` whose labels contain `label` (`""`: all of them).
pub fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) || !rest.contains(label) {
                return None;
            }
            rest.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Hands out accounts to writers; makes a new one (counted) when the prepared ones run out.
pub struct Accounts {
    prepared: Vec<String>,
    next: AtomicUsize,
    made_during_run: AtomicUsize,
}

impl Accounts {
    pub fn new(prepared: Vec<String>) -> Accounts {
        Accounts {
            prepared,
            next: AtomicUsize::new(0),
            made_during_run: AtomicUsize::new(0),
        }
    }

    async fn take(&self, client: &Client, base: &str, admin: &str) -> Result<String, String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        match self.prepared.get(i) {
            Some(sid) => Ok(sid.clone()),
            None => {
                self.made_during_run.fetch_add(1, Ordering::Relaxed);
                create_account(client, base, admin).await
            }
        }
    }

    /// How many accounts a run needs at `rate` writes/s for `seconds`, with room to spare.
    pub fn needed(concurrency: usize, rate: f64, seconds: f64) -> usize {
        let keys = rate * seconds;
        concurrency + (keys / KEYS_PER_ACCOUNT as f64).ceil() as usize
    }
}

/// What one timed run of key writes saw.
#[derive(Debug, Clone, Default)]
pub struct WriteRun {
    /// 201s answered inside the measured window.
    pub created: usize,
    /// Answers other than 201 (warm-up included), by status.
    pub other: BTreeMap<String, usize>,
    /// Latencies (ms) of the 201s answered inside the window.
    pub latencies_ms: Vec<f64>,
    pub seconds: f64,
    pub accounts_made_during_run: usize,
}

impl WriteRun {
    pub fn rate(&self) -> f64 {
        self.created as f64 / self.seconds
    }
}

/// `concurrency` clients, client i writing through `bases[i % bases.len()]`, each creating keys
/// one after another: `warmup` then `seconds` measured.
pub async fn write_run(
    client: &Client,
    bases: &[String],
    admin: &str,
    accounts: Arc<Accounts>,
    concurrency: usize,
    warmup: Duration,
    seconds: Duration,
) -> Result<WriteRun, String> {
    let start = Instant::now() + warmup;
    let end = start + seconds;
    let shared = Arc::new(Mutex::new(WriteRun {
        seconds: seconds.as_secs_f64(),
        ..WriteRun::default()
    }));
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let base = bases[i % bases.len()].clone();
        let (client, admin, accounts, shared) = (
            client.clone(),
            admin.to_owned(),
            accounts.clone(),
            shared.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut created = 0usize;
            let mut other: BTreeMap<String, usize> = BTreeMap::new();
            let mut lat = Vec::new();
            let mut account = accounts.take(&client, &base, &admin).await?;
            let mut in_account = 0usize;
            while Instant::now() < end {
                if in_account == KEYS_PER_ACCOUNT {
                    account = accounts.take(&client, &base, &admin).await?;
                    in_account = 0;
                }
                let url = format!("{base}/v1/accounts/{account}/keys");
                let sent = Instant::now();
                let outcome = call(
                    &client,
                    Method::POST,
                    &url,
                    &admin,
                    Some("{}"),
                    Duration::from_secs(30),
                )
                .await;
                let done = Instant::now();
                match outcome {
                    Ok((StatusCode::CREATED, _)) => {
                        in_account += 1;
                        if done >= start && done < end {
                            created += 1;
                            lat.push(done.duration_since(sent).as_secs_f64() * 1e3);
                        }
                    }
                    Ok((status, _)) => {
                        // A 409 too_many_keys would mean this account is full: move on.
                        in_account = KEYS_PER_ACCOUNT;
                        *other.entry(status.as_u16().to_string()).or_default() += 1;
                    }
                    Err(e) => {
                        let kind = if e.contains("timed out") {
                            "timeout"
                        } else {
                            "transport error"
                        };
                        *other.entry(kind.to_owned()).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            let mut s = shared.lock().await;
            s.created += created;
            s.latencies_ms.extend(lat);
            for (k, v) in other {
                *s.other.entry(k).or_default() += v;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("writer task: {e}"))??;
    }
    let mut run = shared.lock().await.clone();
    run.accounts_made_during_run = accounts.made_during_run.load(Ordering::Relaxed);
    Ok(run)
}

/// One long-poll's answer.
#[derive(Debug)]
pub struct PollAnswer {
    pub at: Instant,
    pub status: StatusCode,
    pub version: Option<u64>,
}

/// Opens one long-poll per entry of `targets` (`base`, edge number):
/// `GET /v1/edge/changes?since=V&known=V&wait=60&edge=sim-N&region=bench`.
pub fn open_polls(
    client: &Client,
    targets: &[(String, usize)],
    edge_token: &str,
    known: u64,
) -> Vec<tokio::task::JoinHandle<Result<PollAnswer, String>>> {
    targets
        .iter()
        .map(|(base, n)| {
            let url = format!(
                "{base}/v1/edge/changes?since={known}&known={known}&wait=60&edge=sim-{n:04}&region=bench"
            );
            let (client, token) = (client.clone(), edge_token.to_owned());
            tokio::spawn(async move {
                let (status, body) = call(
                    &client,
                    Method::GET,
                    &url,
                    &token,
                    None,
                    Duration::from_secs(90),
                )
                .await?;
                let at = Instant::now();
                let version = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["version"].as_u64());
                Ok(PollAnswer {
                    at,
                    status,
                    version,
                })
            })
        })
        .collect()
}

/// Deletes a key (admin token); the instant its 204 arrived and how long it took.
pub async fn delete_key(
    client: &Client,
    base: &str,
    admin: &str,
    account: &str,
    key: &str,
) -> Result<(Instant, Duration), String> {
    let sent = Instant::now();
    let (status, body) = call(
        client,
        Method::DELETE,
        &format!("{base}/v1/accounts/{account}/keys/{key}"),
        admin,
        None,
        Duration::from_secs(30),
    )
    .await?;
    let done = Instant::now();
    if status != StatusCode::NO_CONTENT {
        return Err(format!(
            "DELETE key: {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok((done, done.duration_since(sent)))
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}
