//! A small blocking W3C WebDriver client for the web UI's browser tests: [`Browser`] starts
//! `chromedriver` on a free port with a headless Chromium session, and drives it over plain
//! HTTP/JSON (navigation, CSS lookups, clicks, typing, scripts, screenshots, alerts, cookies).
//!
//! Chromium and chromedriver come from `$TRAINQ_CHROMIUM` / `$TRAINQ_CHROMEDRIVER`, else the
//! PATH. A missing one is an error naming what to install, which the tests `.expect()`: a
//! browser test never skips. Must not know anything about trainq's pages (the tests do).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::proc::free_port;

/// The key under which W3C WebDriver wraps an element reference in JSON.
pub const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How often [`Browser::wait_for`] and [`Browser::wait_until`] look again.
const POLL: Duration = Duration::from_millis(50);

/// Longer than any single command should take (page loads and scripts time out at 30 s inside
/// the browser), so that a hung chromedriver fails the test instead of hanging it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

const INSTALL_HINT: &str = "the web UI's browser tests drive headless Chromium through \
     chromedriver: install Debian's `chromium` and `chromium-driver` \
     (`apt-get install chromium chromium-driver`; .ci/run does)";

/// An element of the current page, as the W3C element id the browser gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

impl Element {
    /// The W3C element id.
    pub fn id(&self) -> &str {
        &self.0
    }

    /// The element as a script argument of [`Browser::execute`] (`arguments[i]` is the DOM node).
    pub fn to_json(&self) -> Value {
        json!({ ELEMENT_KEY: self.0 })
    }

    /// The element a script returned (a DOM node comes back as an element reference).
    pub fn from_json(value: &Value) -> Option<Element> {
        value
            .get(ELEMENT_KEY)
            .and_then(Value::as_str)
            .map(|id| Element(id.to_owned()))
    }
}

/// An error answer of the WebDriver protocol: its error code (`no such element`, `javascript
/// error`, ...) and message. Reach it with `err.downcast_ref::<WebDriverError>()`.
#[derive(Debug, Clone)]
pub struct WebDriverError {
    /// `GET /title` and the like: which command failed.
    pub command: String,
    pub status: u16,
    pub error: String,
    pub message: String,
}

impl fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WebDriver {} answered {} {}: {}",
            self.command, self.status, self.error, self.message
        )
    }
}

impl std::error::Error for WebDriverError {}

/// Whether `err` is the WebDriver error `code` (for example `no such element`).
fn is_webdriver_error(err: &anyhow::Error, code: &str) -> bool {
    err.downcast_ref::<WebDriverError>()
        .is_some_and(|e| e.error == code)
}

#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Delete,
}

/// A `data:` URL of an HTML document, for tests that need a page without a server.
pub fn data_url(html: &str) -> String {
    format!("data:text/html;charset=utf-8,{}", percent_encode(html))
}

/// A headless Chromium session through its own chromedriver. Dropping it ends the session and
/// kills chromedriver (and with it the browser).
pub struct Browser {
    agent: ureq::Agent,
    /// `http://127.0.0.1:<port>/session/<id>`: every command's URL starts with it.
    session: String,
    driver: Child,
    /// chromedriver's log and the browser profile, removed on drop.
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session (1280x900).
    pub fn start() -> anyhow::Result<Browser> {
        let chromedriver = locate("TRAINQ_CHROMEDRIVER", &["chromedriver"])?;
        let chromium = locate("TRAINQ_CHROMIUM", &["chromium", "chromium-browser"])?;
        let dir = tempfile::Builder::new()
            .prefix("trainq-browser-")
            .tempdir()
            .context("temp dir for chromedriver")?;
        let log = std::fs::File::create(dir.path().join("chromedriver.log"))?;
        let port = free_port();
        let mut cmd = Command::new(&chromedriver);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        // Its own process group, so that drop can also end the browser processes it started.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd
            .spawn()
            .with_context(|| format!("starting {}", chromedriver.display()))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(COMMAND_TIMEOUT))
            // chromedriver is on loopback: a proxy from the environment must not be used.
            .proxy(None)
            .build()
            .into();
        let mut browser = Browser {
            agent,
            session: format!("http://127.0.0.1:{port}"),
            driver,
            dir,
        };
        browser.wait_for_driver(Duration::from_secs(30))?;
        let profile = browser.dir.path().join("profile");
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    // An alert stays open (and the next command fails) until the test looks at
                    // it, instead of being dismissed behind the test's back.
                    "unhandledPromptBehavior": "ignore",
                    "timeouts": { "pageLoad": 30_000, "script": 30_000, "implicit": 0 },
                    "goog:chromeOptions": {
                        "binary": chromium.to_string_lossy(),
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--window-size=1280,900",
                            format!("--user-data-dir={}", profile.display()),
                        ],
                    },
                },
            },
        });
        let created = browser
            .request(Method::Post, "/session", Some(capabilities))
            .with_context(|| {
                format!(
                    "creating a headless Chromium session ({}); chromedriver's log:\n{}",
                    chromium.display(),
                    browser.driver_log()
                )
            })?;
        let id = created
            .get("sessionId")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("new session answer without a sessionId: {created}"))?;
        browser.session = format!("{}/session/{id}", browser.session);
        Ok(browser)
    }

    /// Polls `GET /status` until chromedriver says it is ready.
    fn wait_for_driver(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ready = self
                .request(Method::Get, "/status", None)
                .ok()
                .and_then(|status| status.get("ready").and_then(Value::as_bool));
            if ready == Some(true) {
                return Ok(());
            }
            if let Some(exit) = self.driver.try_wait()? {
                bail!(
                    "chromedriver exited at start ({exit}):\n{}",
                    self.driver_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "chromedriver not ready within {within:?}:\n{}",
                    self.driver_log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// chromedriver's output so far (for error messages).
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// One WebDriver command on the driver (a path starting at `/session/<id>` or `/status`
    /// before the session exists); answers the `value` of its JSON answer.
    fn request(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.session);
        let (name, response) = match method {
            Method::Get => ("GET", self.agent.get(&url).call()),
            Method::Delete => ("DELETE", self.agent.delete(&url).call()),
            Method::Post => {
                // W3C commands without parameters still take an empty JSON object.
                let body = body.unwrap_or_else(|| json!({}));
                (
                    "POST",
                    self.agent
                        .post(&url)
                        .header("Content-Type", "application/json; charset=utf-8")
                        .send(body.to_string()),
                )
            }
        };
        let command = format!("{name} {path}");
        let mut response = response.with_context(|| format!("WebDriver {command}"))?;
        let status = response.status().as_u16();
        // Screenshots of a large page run to megabytes of base64.
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .with_context(|| format!("reading the answer of WebDriver {command}"))?;
        let answer: Value = serde_json::from_str(&text).with_context(|| {
            format!("WebDriver {command} answered {status} with no JSON: {text}")
        })?;
        let value = answer.get("value").cloned().unwrap_or(Value::Null);
        let error = value.get("error").and_then(Value::as_str);
        if !(200..300).contains(&status) || error.is_some() {
            return Err(WebDriverError {
                command,
                status,
                error: error.unwrap_or("unknown error").to_owned(),
                message: value
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            }
            .into());
        }
        Ok(value)
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.request(Method::Get, path, None)
    }

    fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.request(Method::Post, path, Some(body))
    }

    fn string(&self, path: &str) -> anyhow::Result<String> {
        let value = self.get(path)?;
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("GET {path}: expected a string, got {value}"))
    }

    /// Loads `url` and waits until the page has loaded.
    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({ "url": url }))
            .with_context(|| format!("loading {url}"))?;
        Ok(())
    }

    pub fn current_url(&self) -> anyhow::Result<String> {
        self.string("/url")
    }

    pub fn title(&self) -> anyhow::Result<String> {
        self.string("/title")
    }

    /// The current DOM serialised as HTML.
    pub fn page_source(&self) -> anyhow::Result<String> {
        self.string("/source")
    }

    /// The first element matching the CSS selector, or None when there is none.
    pub fn find(&self, css: &str) -> anyhow::Result<Option<Element>> {
        match self.post("/element", json!({ "using": "css selector", "value": css })) {
            Ok(value) => Element::from_json(&value)
                .map(Some)
                .ok_or_else(|| anyhow!("find `{css}`: no element reference in {value}")),
            Err(e) if is_webdriver_error(&e, "no such element") => Ok(None),
            Err(e) => Err(e.context(format!("finding `{css}`"))),
        }
    }

    /// Every element matching the CSS selector, in document order.
    pub fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let value = self
            .post(
                "/elements",
                json!({ "using": "css selector", "value": css }),
            )
            .with_context(|| format!("finding all `{css}`"))?;
        let list = value
            .as_array()
            .ok_or_else(|| anyhow!("find all `{css}`: expected a list, got {value}"))?;
        list.iter()
            .map(|v| {
                Element::from_json(v)
                    .ok_or_else(|| anyhow!("find all `{css}`: not an element reference: {v}"))
            })
            .collect()
    }

    /// The element's rendered text (as a user sees it: hidden text is left out).
    pub fn text(&self, element: &Element) -> anyhow::Result<String> {
        self.string(&format!("/element/{}/text", element.0))
    }

    /// The element's HTML attribute `name`, or None when it has none. For what a user typed into
    /// an input, read [`Self::property`] `value`: the attribute keeps the page's initial value.
    pub fn attr(&self, element: &Element, name: &str) -> anyhow::Result<Option<String>> {
        let value = self.get(&format!(
            "/element/{}/attribute/{}",
            element.0,
            percent_encode(name)
        ))?;
        Ok(match value {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        })
    }

    /// The element's DOM property `name` (for example `checked` or `value`) as JSON.
    pub fn property(&self, element: &Element, name: &str) -> anyhow::Result<Value> {
        self.get(&format!(
            "/element/{}/property/{}",
            element.0,
            percent_encode(name)
        ))
    }

    /// Scrolls the element into view and clicks its centre (an error when something covers it).
    pub fn click(&self, element: &Element) -> anyhow::Result<()> {
        self.post(&format!("/element/{}/click", element.0), json!({}))?;
        Ok(())
    }

    /// Types `text` into the element (focusing it first), as key presses.
    pub fn send_keys(&self, element: &Element, text: &str) -> anyhow::Result<()> {
        self.post(
            &format!("/element/{}/value", element.0),
            json!({ "text": text }),
        )?;
        Ok(())
    }

    /// Empties an input or textarea.
    pub fn clear(&self, element: &Element) -> anyhow::Result<()> {
        self.post(&format!("/element/{}/clear", element.0), json!({}))?;
        Ok(())
    }

    /// Runs `script` as the body of a function in the page (`return` gives the answer;
    /// `arguments[i]` are `args`, with [`Element::to_json`] for elements) and answers what it
    /// returned as JSON (a DOM node as an element reference, see [`Element::from_json`]).
    pub fn execute(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
    }

    /// Like [`Self::execute`], for a script that ends by calling its last argument (the
    /// callback) with the answer, for example after a `fetch`.
    pub fn execute_async(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.post("/execute/async", json!({ "script": script, "args": args }))
    }

    /// Polls every 50 ms until an element matches `css`; an error naming the selector after
    /// `timeout`.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> anyhow::Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(element) = self.find(css)? {
                return Ok(element);
            }
            if Instant::now() >= deadline {
                bail!("no element matches `{css}` within {timeout:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls every 50 ms until the JavaScript expression `condition` is truthy; an error naming
    /// it after `timeout`. A script error (for example an element that does not exist yet)
    /// counts as not yet, and the last one is in the timeout's message.
    pub fn wait_until(&self, condition: &str, timeout: Duration) -> anyhow::Result<()> {
        let script = format!("return !!({condition});");
        let deadline = Instant::now() + timeout;
        loop {
            let last_error = match self.execute(&script, Vec::new()) {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(_) => None,
                Err(e) if is_webdriver_error(&e, "javascript error") => Some(e),
                Err(e) => return Err(e.context(format!("waiting until `{condition}`"))),
            };
            if Instant::now() >= deadline {
                match last_error {
                    Some(e) => bail!("`{condition}` not true within {timeout:?} (last: {e:#})"),
                    None => bail!("`{condition}` not true within {timeout:?}"),
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// A PNG of the viewport.
    pub fn screenshot_png(&self) -> anyhow::Result<Vec<u8>> {
        let encoded = self.string("/screenshot")?;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .context("decoding the screenshot's base64")
    }

    /// Writes a PNG of the viewport to `path` (to look at after a failed test).
    pub fn screenshot(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let png = self.screenshot_png()?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// The text of the open alert, confirm or prompt, or None when none is open.
    pub fn alert_text(&self) -> anyhow::Result<Option<String>> {
        match self.string("/alert/text") {
            Ok(text) => Ok(Some(text)),
            Err(e) if is_webdriver_error(&e, "no such alert") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Closes the open alert (a confirm answers Cancel).
    pub fn dismiss_alert(&self) -> anyhow::Result<()> {
        self.post("/alert/dismiss", json!({}))?;
        Ok(())
    }

    /// Sets a cookie on the current page's origin (a page of that origin must be loaded).
    pub fn add_cookie(&self, name: &str, value: &str) -> anyhow::Result<()> {
        self.post(
            "/cookie",
            json!({ "cookie": { "name": name, "value": value } }),
        )?;
        Ok(())
    }

    pub fn delete_all_cookies(&self) -> anyhow::Result<()> {
        self.request(Method::Delete, "/cookie", None)?;
        Ok(())
    }

    /// The browser's Back button.
    pub fn back(&self) -> anyhow::Result<()> {
        self.post("/back", json!({}))?;
        Ok(())
    }

    pub fn refresh(&self) -> anyhow::Result<()> {
        self.post("/refresh", json!({}))?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.session.contains("/session/") {
            let _ = self.request(Method::Delete, "", None);
        }
        // The group holds chromedriver and any browser process that outlived the session.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Every byte but the unreserved ones of RFC 3986 as `%XX`: safe in a URL path segment and in a
/// `data:` URL.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `$var` when set (it must exist), else the first of `names` on the PATH.
fn locate(var: &str, names: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("${var} is {}, which does not exist", path.display());
        }
        return Ok(path);
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "{} not found (${var}, or on the PATH): {INSTALL_HINT}",
                names.join(" or ")
            )
        })
}
