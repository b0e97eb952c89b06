//! keygate's browser test tier: a headless Chromium from Debian's packages (`chromium`,
//! `chromium-driver`; `make setup-browser` installs them) driven over WebDriver by
//! [fantoccini](https://docs.rs/fantoccini). [`Browser::start`] starts `chromedriver` on a free
//! 127.0.0.1 port, opens one headless session and ends both on drop; the tests in `tests/` point
//! it at a real control plane's console and use what it makes through a real Envoy.
//!
//! `KEYGATE_CHROMEDRIVER` and `KEYGATE_CHROMIUM` name the binaries when they are not Debian's
//! (`/usr/bin/chromedriver`, `/usr/bin/chromium`).
//!
//! Test support: failing loudly is its job, so the workspace's panic denials are lifted here.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

fn binary(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.exists(),
        "{} not found: run `make setup-browser` (Debian's chromium and chromium-driver) or set {var}",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A headless Chromium session through its own chromedriver.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium (1280 × 1000) through it.
    pub async fn start() -> Browser {
        let driver_bin = binary("KEYGATE_CHROMEDRIVER", "/usr/bin/chromedriver");
        let chromium = binary("KEYGATE_CHROMIUM", "/usr/bin/chromium");
        let port = free_port();
        let mut driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = driver.kill();
                panic!("chromedriver did not listen on 127.0.0.1:{port} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         "--no-first-run", "--no-proxy-server"],
            }),
        );
        let client = match ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let _ = driver.kill();
                panic!("no WebDriver session with headless Chromium: {e}");
            }
        };
        Browser { client, driver }
    }

    /// Goes to `url` and answers the page's HTML.
    pub async fn open(&self, url: &str) -> String {
        self.client.goto(url).await.expect("navigate");
        self.source().await
    }

    /// The current page's HTML.
    pub async fn source(&self) -> String {
        self.client.source().await.expect("page source")
    }

    /// The current URL's path (and query).
    pub async fn path(&self) -> String {
        let url = self.client.current_url().await.expect("current URL");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        }
    }

    /// Types `text` into the field `css` (cleared first).
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    /// Clicks the element `css`.
    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The text of the element `css`.
    pub async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .text()
            .await
            .expect("text")
    }

    /// Saves a PNG of the window to `path` (parent directories made).
    pub async fn screenshot(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Runs `script` as an async script (it calls `arguments[arguments.length - 1]` with its
    /// result) and answers the result.
    pub async fn run_async(&self, script: &str) -> serde_json::Value {
        self.client
            .execute_async(script, Vec::new())
            .await
            .expect("script")
    }
}

impl Browser {
    /// Ends the WebDriver session (Chromium exits), then chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium exits when its chromedriver does (also when a test panics before closing).
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
