//! The web UI in a real browser (headless Chromium through chromedriver) against the real
//! coordinator: the runs table and its filters, a run's curves drawn and a point reported after
//! the page opened appearing without a reload, a hostile job name staying text, bad requests,
//! cancel from the button, the CSRF checks and, with client tokens, the login.
//!
//! The test acts as the worker itself (ClaimJob, ReportMetrics over gRPC), so what the page
//! shows is exactly what was reported. Screenshots of the pages go to
//! `target/test-output/web/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use proto::v1;
use proto::v1::job_service_client::JobServiceClient;
use proto::v1::worker_service_client::WorkerServiceClient;
use serde_json::json;
use tests::browser::Browser;
use tests::{free_port, mnist_spec_json, workspace_root, Coordinator, TestEnv};
use tonic::transport::Channel;

const XSS_NAME: &str = "<img src=x onerror=alert(1)>";
const CLIENT_TOKEN: &str = "web-client-secret";
const WORKER_TOKEN: &str = "web-worker-secret";

fn out_dir() -> PathBuf {
    let dir = workspace_root().join("target/test-output/web");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

fn spec(name: &str) -> v1::JobSpec {
    serde_json::from_str(&mnist_spec_json(name, 1, 64, 64)).expect("spec JSON")
}

/// A request with the client or worker token (auth on), or none.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header value"),
        );
    }
    req
}

struct Ui {
    coordinator: Coordinator,
    base: String,
    jobs: JobServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
    client_token: Option<&'static str>,
    worker_token: Option<&'static str>,
}

impl Ui {
    async fn start(env: &TestEnv, auth: bool) -> Ui {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut flags = vec!["--http-listen", listen.as_str()];
        if auth {
            flags.extend([
                "--client-tokens",
                CLIENT_TOKEN,
                "--worker-tokens",
                WORKER_TOKEN,
            ]);
        }
        let coordinator = env.start_coordinator(&flags).await;
        let channel = Channel::from_shared(coordinator.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let base = format!("http://{listen}");
        wait_http(&base).await;
        Ui {
            coordinator,
            base,
            jobs: JobServiceClient::new(channel.clone()),
            workers: WorkerServiceClient::new(channel),
            client_token: auth.then_some(CLIENT_TOKEN),
            worker_token: auth.then_some(WORKER_TOKEN),
        }
    }

    async fn submit(&mut self, name: &str) -> String {
        self.jobs
            .submit_job(with_token(
                v1::SubmitJobRequest {
                    spec: Some(spec(name)),
                    request_id: String::new(),
                },
                self.client_token,
            ))
            .await
            .expect("submit")
            .into_inner()
            .job_id
    }

    async fn claim(&mut self, id: &str) -> v1::JobLease {
        let r = self
            .workers
            .claim_job(with_token(
                v1::ClaimJobRequest {
                    job_id: id.into(),
                    worker_id: "web-test-worker".into(),
                    ..Default::default()
                },
                self.worker_token,
            ))
            .await
            .expect("claim")
            .into_inner();
        assert!(r.claimed, "the test claims its own job");
        r.lease.expect("a lease")
    }

    async fn report(&mut self, lease: &v1::JobLease, steps: std::ops::Range<u64>) {
        self.workers
            .report_metrics(with_token(
                v1::ReportMetricsRequest {
                    lease: Some(lease.clone()),
                    points: steps
                        .map(|s| v1::MetricPoint {
                            name: "train/loss".into(),
                            step: s,
                            epoch: 1,
                            value: 2.0 / (s as f64 + 1.0),
                        })
                        .collect(),
                },
                self.worker_token,
            ))
            .await
            .expect("report");
    }

    async fn state(&mut self, id: &str) -> v1::JobState {
        self.jobs
            .get_job(with_token(
                v1::GetJobRequest { job_id: id.into() },
                self.client_token,
            ))
            .await
            .expect("get")
            .into_inner()
            .state()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

async fn wait_http(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = base.trim_start_matches("http://").to_string();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the web UI never listened on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// (status, body) of a GET without a browser (no cookies).
fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().expect("GET");
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap_or_default())
}

/// A form POST from outside the browser, with an Origin header when given.
fn post(url: &str, origin: Option<&str>, form: &[(&str, &str)]) -> u16 {
    let mut req = agent().post(url);
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    req.send_form(form.iter().copied())
        .expect("POST")
        .status()
        .as_u16()
}

fn rows(browser: &Browser) -> usize {
    browser.find_all("#runs tbody tr").expect("rows").len()
}

/// Pixels of the first series' colour (#1f77b4) in a chart's canvas: the line, not the axes.
fn line_pixels(browser: &Browser) -> u64 {
    browser
        .execute(
            "const c = document.querySelector('#charts canvas');
             if (!c) return 0;
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let n = 0;
             for (let i = 0; i < d.length; i += 4) {
               if (Math.abs(d[i] - 31) < 40 && Math.abs(d[i+1] - 119) < 40 && Math.abs(d[i+2] - 180) < 40 && d[i+3] > 0) n++;
             }
             return n;",
            vec![],
        )
        .expect("count pixels")
        .as_u64()
        .unwrap_or(0)
}

/// Presses the open run page's cancel button and waits for the page to show the job cancelled.
fn cancel_from_the_button(browser: &Browser) {
    let button = browser
        .find("#cancel-button")
        .expect("find")
        .expect("a job that has not ended has a cancel button");
    browser.click(&button).expect("cancel");
    browser
        .wait_until(
            "document.getElementById('state') && document.getElementById('state').textContent === 'cancelled'",
            Duration::from_secs(10),
        )
        .expect("the page shows the job cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_table_a_live_run_page_and_hostile_input() {
    let env = TestEnv::new();
    let mut ui = Ui::start(&env, false).await;
    let live = ui.submit("alpha-live").await;
    let queued = ui.submit("beta-queued").await;
    let hostile = ui.submit(XSS_NAME).await;
    let lease = ui.claim(&live).await;
    ui.report(&lease, 0..40).await;

    let browser = Browser::start().expect("headless Chromium (.ci/run installs it)");
    let out = out_dir();

    // The runs table: every job, newest first, the hostile name as text and no script run.
    browser.goto(&ui.url("/")).expect("runs page");
    browser
        .wait_for("#runs tbody tr", Duration::from_secs(10))
        .expect("the runs table");
    assert_eq!(rows(&browser), 3);
    let first = browser
        .find("#runs tbody tr")
        .expect("find")
        .expect("a row");
    assert_eq!(
        browser.attr(&first, "data-job-id").expect("attr"),
        Some(hostile.clone()),
        "newest first"
    );
    let name_cell = browser
        .find(&format!("tr[data-job-id='{hostile}'] td.name"))
        .expect("find")
        .expect("the hostile job's name cell");
    assert_eq!(browser.text(&name_cell).expect("text"), XSS_NAME);
    let injected = browser
        .execute(
            "return document.querySelectorAll('img[src=\"x\"]').length",
            vec![],
        )
        .expect("script");
    assert_eq!(injected, json!(0), "the name made no element");
    assert_eq!(
        browser.alert_text().expect("alert"),
        None,
        "no dialog opened"
    );
    browser
        .screenshot(out.join("runs.png"))
        .expect("screenshot");

    // The filter form narrows the table.
    let name = browser
        .find("#filters input[name=name]")
        .expect("find")
        .expect("the name filter");
    browser.send_keys(&name, "BETA").expect("type");
    let submit = browser
        .find("#filters button")
        .expect("find")
        .expect("the filter button");
    browser.click(&submit).expect("filter");
    browser
        .wait_until(
            "document.querySelectorAll('#runs tbody tr').length === 1",
            Duration::from_secs(10),
        )
        .expect("one row after filtering");
    let only = browser
        .find("#runs tbody tr")
        .expect("find")
        .expect("a row");
    assert_eq!(
        browser.attr(&only, "data-job-id").expect("attr"),
        Some(queued.clone())
    );
    browser
        .goto(&ui.url("/?state=running"))
        .expect("state filter");
    assert_eq!(rows(&browser), 1, "only the running job");

    // Bad requests: a message, never a panic page or a 500.
    let (status, body) = get(&ui.url("/?size=lots"));
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&ui.url("/?state=sleeping"));
    assert_eq!(status, 400);
    assert!(body.contains("state must be one of"), "{body}");
    let (status, _) = get(&ui.url("/runs/not-a-job-id"));
    assert_eq!(status, 400);
    let (status, _) = get(&ui.url(&format!("/runs/{}", uuid::Uuid::new_v4())));
    assert_eq!(status, 404);
    let (status, _) = get(&ui.url("/no/such/page"));
    assert_eq!(status, 404);
    let (status, body) = get(&ui.url("/?size=1000000"));
    assert_eq!(
        status, 200,
        "a huge page size is capped, not refused: {body}"
    );

    // The run page draws its curve, then a point reported now appears without a reload.
    browser
        .goto(&ui.url(&format!("/runs/{live}")))
        .expect("run page");
    browser
        .wait_until(
            "window.trainqLive && window.trainqLive.charts >= 1",
            Duration::from_secs(10),
        )
        .expect("a chart");
    assert!(line_pixels(&browser) > 20, "the loss curve was drawn");
    // The stream is open once the page has its EventSource; give it a moment to connect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ui.report(&lease, 40..41).await;
    browser
        .wait_until(
            "window.trainqLive.lastStep['train/loss'] === 40",
            Duration::from_secs(2),
        )
        .expect("the new point appears within 2 s, without a reload");
    browser.screenshot(out.join("run.png")).expect("screenshot");

    // Compare: tick two runs in the table; the page overlays their curves of the metric.
    let other = ui.submit("gamma-compare").await;
    let other_lease = ui.claim(&other).await;
    ui.report(&other_lease, 0..10).await;
    browser.goto(&ui.url("/")).expect("runs page");
    for id in [&live, &other] {
        let tick = browser
            .find(&format!("tr[data-job-id='{id}'] input[name=run]"))
            .expect("find")
            .expect("a checkbox per run");
        browser.click(&tick).expect("tick");
    }
    let compare = browser
        .find("#compare-form button[type=submit]")
        .expect("find")
        .expect("the compare button");
    browser.click(&compare).expect("compare");
    browser
        .wait_for("#compared", Duration::from_secs(10))
        .expect("the comparison");
    let shown: Vec<String> = browser
        .find_all("#compared tbody tr td.num:nth-of-type(3)")
        .expect("rows")
        .iter()
        .map(|e| browser.text(e).expect("text"))
        .collect();
    assert_eq!(shown.len(), 2, "both runs are compared");
    let mut shown_sorted = shown.clone();
    shown_sorted.sort();
    assert_eq!(
        shown_sorted,
        vec!["10", "41"],
        "every point of each run's train/loss"
    );
    browser
        .wait_until("window.trainqLive.charts === 1", Duration::from_secs(10))
        .expect("one overlaid chart");
    let (status, body) = get(&ui.url(&format!("/compare?run={live}&bogus=1")));
    assert_eq!(status, 400, "{body}");

    // A cross-site POST and a POST without the CSRF token are refused; nothing is cancelled.
    let cancel_url = ui.url(&format!("/runs/{queued}/cancel"));
    assert_eq!(
        post(&cancel_url, Some("http://evil.example"), &[("csrf", "x")]),
        403
    );
    assert_eq!(post(&cancel_url, None, &[("csrf", "guess")]), 403);
    assert_eq!(ui.state(&queued).await, v1::JobState::Queued);

    // Cancel from the button.
    browser
        .goto(&ui.url(&format!("/runs/{live}")))
        .expect("run page");
    cancel_from_the_button(&browser);
    assert_eq!(ui.state(&live).await, v1::JobState::Cancelled);

    // Workers and sweeps pages render (the test's fake worker sends no fleet heartbeat).
    browser.goto(&ui.url("/workers")).expect("workers");
    assert!(browser.find("#workers").expect("find").is_some());
    browser
        .screenshot(out.join("workers.png"))
        .expect("screenshot");
    drop(ui.coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_tokens_the_ui_asks_for_one_and_checks_csrf() {
    let env = TestEnv::new();
    let mut ui = Ui::start(&env, true).await;
    let job = ui.submit("needs-login").await;

    // No session: 401 and the login form, for pages and endpoints alike.
    for path in [
        "/".to_string(),
        format!("/runs/{job}"),
        format!("/runs/{job}/events"),
        "/workers".to_string(),
    ] {
        let (status, body) = get(&ui.url(&path));
        assert_eq!(status, 401, "{path}");
        assert!(body.contains("id=\"login\""), "{path} shows the login form");
    }

    let browser = Browser::start().expect("headless Chromium (.ci/run installs it)");
    browser
        .goto(&ui.url(&format!("/runs/{job}")))
        .expect("run page");
    let sign_in = |token: &str| {
        let field = browser
            .wait_for("#token", Duration::from_secs(10))
            .expect("the token field");
        browser.send_keys(&field, token).expect("type");
        let button = browser
            .find("#sign-in")
            .expect("find")
            .expect("the sign-in button");
        // Mark this document, so the waits below see the answer's page, not this one.
        browser
            .execute("document.body.dataset.before = 'submit'", vec![])
            .expect("mark the page");
        browser.click(&button).expect("sign in");
        browser
            .wait_until(
                "document.readyState === 'complete' && document.body && !document.body.dataset.before",
                Duration::from_secs(10),
            )
            .expect("the answer to the sign-in");
    };
    sign_in("not-the-token");
    browser
        .wait_for("#login-error", Duration::from_secs(10))
        .expect("a wrong token is refused");
    assert!(browser.find("#state").expect("find").is_none());
    // A worker token is not a client token.
    sign_in(WORKER_TOKEN);
    browser
        .wait_for("#login-error", Duration::from_secs(10))
        .expect("a worker token is refused");
    sign_in(CLIENT_TOKEN);
    browser
        .wait_for("#state", Duration::from_secs(10))
        .expect("the right token opens the page it was asked for");

    // With the session: a POST with a wrong CSRF token is refused (fetch sends the cookie).
    let status = browser
        .execute(
            "return fetch(arguments[0], {method: 'POST', body: new URLSearchParams({csrf: 'forged'})})
               .then(r => r.status);",
            vec![json!(format!("/runs/{job}/cancel"))],
        )
        .expect("fetch");
    assert_eq!(status, json!(403));
    assert_eq!(ui.state(&job).await, v1::JobState::Queued);

    cancel_from_the_button(&browser);
    assert_eq!(ui.state(&job).await, v1::JobState::Cancelled);

    browser.goto(&ui.url("/")).expect("runs page");
    assert_eq!(rows(&browser), 1, "the session opens the runs table");
    browser
        .screenshot(out_dir().join("login-runs.png"))
        .expect("screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_page_shows_the_numbers_of_get_sweep_summary() {
    let env = TestEnv::new();
    let mut ui = Ui::start(&env, false).await;
    let spec: v1::SweepSpec = serde_json::from_value(json!({
        "name": "web-sweep",
        "base": serde_json::from_str::<serde_json::Value>(&mnist_spec_json("s", 2, 64, 64)).expect("json"),
        "grid": [{"field": "training.learningRate", "values": [0.001, 0.01]}],
        "seeds": [1, 2, 3],
    }))
    .expect("sweep spec");
    let sweep_id = ui
        .jobs
        .submit_sweep(v1::SubmitSweepRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect("submit sweep")
        .into_inner()
        .sweep_id;
    let sweep = ui
        .jobs
        .get_sweep(v1::GetSweepRequest {
            sweep_id: sweep_id.clone(),
            ..Default::default()
        })
        .await
        .expect("get sweep")
        .into_inner();
    // Each run "trains" two epochs; the second arm ends lower, by an amount that varies by seed.
    for run in &sweep.runs {
        let lease = ui.claim(&run.job_id).await;
        let arm = sweep.arms.iter().position(|a| *a == run.arm).unwrap_or(0) as f64;
        let points = [(10, 1), (20, 2)]
            .into_iter()
            .flat_map(|(step, epoch)| {
                let loss = 2.0 / epoch as f64 - 0.3 * arm - 0.01 * run.seed as f64 * arm;
                [
                    v1::MetricPoint {
                        name: "test/loss".into(),
                        step,
                        epoch,
                        value: loss,
                    },
                    v1::MetricPoint {
                        name: "test/accuracy".into(),
                        step,
                        epoch,
                        value: 0.5 + 0.1 * arm + 0.001 * run.seed as f64,
                    },
                ]
            })
            .collect();
        ui.workers
            .report_metrics(v1::ReportMetricsRequest {
                lease: Some(lease.clone()),
                points,
            })
            .await
            .expect("report");
        ui.workers
            .complete_job(v1::CompleteJobRequest {
                lease: Some(lease),
                final_step: 20,
            })
            .await
            .expect("complete");
    }
    let baseline = sweep.arms[0].clone();
    let summary = ui
        .jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep_id.clone(),
            baseline_arm: baseline.clone(),
            ..Default::default()
        })
        .await
        .expect("summary")
        .into_inner();

    let browser = Browser::start().expect("headless Chromium (.ci/run installs it)");
    // Both arms start from random weights: no default baseline, and the page says so.
    browser
        .goto(&ui.url(&format!("/sweeps/{sweep_id}")))
        .expect("sweep page");
    assert!(browser.find("#summary-error").expect("find").is_some());
    browser
        .goto(&ui.url(&format!(
            "/sweeps/{sweep_id}?{}",
            serde_urlencoded::to_string([("baseline", &baseline)]).expect("query")
        )))
        .expect("sweep page with a baseline");
    browser
        .wait_for("#arms", Duration::from_secs(10))
        .expect("the arms table");
    let cell = |s: &Option<v1::Stat>| {
        let s = s.as_ref().expect("a statistic");
        let mut text = proto::report::num(s.mean);
        if let (Some(lo), Some(hi)) = (s.ci_low, s.ci_high) {
            text += &format!(" [{}, {}]", proto::report::num(lo), proto::report::num(hi));
        }
        format!("{text} n={}", s.n)
    };
    let mut checked = 0;
    for arm in &summary.arms {
        for m in &arm.metrics {
            let row = format!("tr[data-arm='{}'][data-metric='{}']", arm.arm, m.name);
            let last = browser
                .find(&format!("{row} td.last"))
                .expect("find")
                .unwrap_or_else(|| panic!("a row for {} {}", arm.arm, m.name));
            assert_eq!(browser.text(&last).expect("text"), cell(&m.last));
            if !arm.baseline {
                let diff = browser
                    .find(&format!("{row} td.diff"))
                    .expect("find")
                    .expect("the paired difference");
                assert_eq!(browser.text(&diff).expect("text"), cell(&m.last_diff));
                let verdict = browser
                    .find(&format!("{row} td.verdict"))
                    .expect("find")
                    .expect("the verdict");
                let expected = match proto::report::judge(
                    m.last_diff.as_ref(),
                    proto::report::lower_is_better(&m.name),
                ) {
                    proto::report::Verdict::Better { .. } => "better",
                    proto::report::Verdict::Worse { .. } => "worse",
                    proto::report::Verdict::NoDifference { .. } => "no difference",
                    proto::report::Verdict::TooFewSeeds { .. } => "too few seeds",
                };
                assert_eq!(browser.text(&verdict).expect("text"), expected);
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "two arms, at least two metrics each");
    browser
        .wait_until("window.trainqLive.charts >= 1", Duration::from_secs(10))
        .expect("the arms' mean curves");
    browser
        .screenshot(out_dir().join("sweep.png"))
        .expect("screenshot");
}
