//! The browser harness itself (tests/src/browser.rs): a real headless Chromium through
//! chromedriver on a page of its own, before the web UI's tests rely on it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::browser::{data_url, Browser, Element};

const PAGE: &str = r#"<!doctype html>
<html>
<head><title>harness check</title></head>
<body>
  <h1 id="heading" class="big">Hello, träinq &amp; friends</h1>
  <form onsubmit="return false">
    <input id="name" name="name" placeholder="your name" value="">
    <button id="greet" type="button"
      onclick="document.getElementById('out').textContent = 'hello ' + document.getElementById('name').value">
      Greet
    </button>
  </form>
  <div id="out"></div>
  <ul><li>one</li><li>two</li><li>three</li></ul>
</body>
</html>"#;

#[test]
fn the_browser_harness_finds_types_clicks_runs_scripts_takes_screenshots_and_sees_alerts() {
    let browser = Browser::start().expect("a headless Chromium session");
    browser.goto(&data_url(PAGE)).expect("load the page");
    assert_eq!(browser.title().expect("title"), "harness check");
    assert!(browser
        .current_url()
        .expect("url")
        .starts_with("data:text/html"));
    assert!(browser
        .page_source()
        .expect("source")
        .contains(r#"id="greet""#));

    let heading = browser
        .find("h1#heading")
        .expect("find the heading")
        .expect("the heading exists");
    // The percent-encoding of the data: URL keeps non-ASCII text and entities intact.
    assert_eq!(
        browser.text(&heading).expect("heading text"),
        "Hello, träinq & friends"
    );
    assert_eq!(
        browser.attr(&heading, "class").expect("class"),
        Some("big".to_owned())
    );
    assert_eq!(browser.attr(&heading, "title").expect("no title"), None);
    assert_eq!(
        browser.find("#missing").expect("find a missing element"),
        None
    );
    let items = browser.find_all("li").expect("find the items");
    let texts: Vec<String> = items
        .iter()
        .map(|li| browser.text(li).expect("item text"))
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(browser.find_all("table").expect("no tables").is_empty());

    let input = browser
        .find("#name")
        .expect("find the input")
        .expect("the input exists");
    browser.send_keys(&input, "Ada").expect("type");
    // What was typed is the live property; the attribute stays what the HTML says.
    assert_eq!(
        browser.property(&input, "value").expect("typed value"),
        json!("Ada")
    );
    assert_eq!(
        browser.attr(&input, "value").expect("value attribute"),
        Some(String::new())
    );
    browser.clear(&input).expect("clear");
    assert_eq!(
        browser.property(&input, "value").expect("cleared value"),
        json!("")
    );
    browser.send_keys(&input, "Grace").expect("type again");
    let button = browser
        .find("#greet")
        .expect("find the button")
        .expect("the button exists");
    browser.click(&button).expect("click");
    let out = browser
        .wait_for("#out", Duration::from_secs(5))
        .expect("the output div");
    assert_eq!(browser.text(&out).expect("output"), "hello Grace");
    browser
        .wait_until(
            "document.getElementById('out').textContent === 'hello Grace'",
            Duration::from_secs(5),
        )
        .expect("the click's text, seen from JavaScript");

    // Arguments in, values out: numbers, an element both ways.
    let sum = browser
        .execute(
            "return arguments[0] + arguments[1];",
            vec![json!(2), json!(40)],
        )
        .expect("a script");
    assert_eq!(sum, json!(42));
    let tag = browser
        .execute("return arguments[0].tagName;", vec![heading.to_json()])
        .expect("an element argument");
    assert_eq!(tag, json!("H1"));
    let returned = browser
        .execute("return document.querySelector('#out');", Vec::new())
        .expect("an element answer");
    let returned = Element::from_json(&returned).expect("a DOM node comes back as an element");
    assert_eq!(browser.text(&returned).expect("its text"), "hello Grace");
    let later = browser
        .execute_async(
            "const done = arguments[arguments.length - 1]; setTimeout(() => done('later'), 10);",
            Vec::new(),
        )
        .expect("an async script");
    assert_eq!(later, json!("later"));
    let error = browser
        .execute("throw new Error('boom');", Vec::new())
        .expect_err("a script that throws is an error");
    assert!(format!("{error:#}").contains("boom"), "{error:#}");

    let dir = tempfile::tempdir().expect("temp dir");
    let shot = dir.path().join("page.png");
    browser.screenshot(&shot).expect("screenshot");
    let png = std::fs::read(&shot).expect("read the screenshot");
    assert!(
        png.len() > 1000,
        "a 1280x900 screenshot of {} bytes",
        png.len()
    );
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "the screenshot is a PNG");

    // A missing element times out with an error that names what was awaited.
    let started = Instant::now();
    let error = browser
        .wait_for(".never-there", Duration::from_millis(300))
        .expect_err("nothing matches");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        format!("{error:#}").contains(".never-there"),
        "the timeout names the selector: {error:#}"
    );
    let error = browser
        .wait_until("window.neverSet === true", Duration::from_millis(200))
        .expect_err("never true");
    assert!(
        format!("{error:#}").contains("window.neverSet"),
        "{error:#}"
    );

    // An alert stays open until the test looks at it, and is gone once dismissed.
    assert_eq!(browser.alert_text().expect("no alert yet"), None);
    browser
        .execute("setTimeout(() => alert('hi'), 0);", Vec::new())
        .expect("schedule an alert");
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        if let Some(text) = browser.alert_text().expect("alert text") {
            break text;
        }
        assert!(Instant::now() < deadline, "no alert within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(text, "hi");
    let blocked = browser.title();
    assert!(
        blocked.is_err(),
        "an open alert blocks other commands: {blocked:?}"
    );
    browser.dismiss_alert().expect("dismiss");
    assert_eq!(browser.alert_text().expect("alert gone"), None);

    browser.refresh().expect("refresh");
    let value = browser
        .execute(
            "return document.getElementById('out').textContent;",
            Vec::new(),
        )
        .expect("after refresh");
    assert_eq!(value, Value::String(String::new()), "a reload starts over");

    browser
        .goto(&data_url("<title>second</title><p>2</p>"))
        .expect("a second page");
    assert_eq!(browser.title().expect("second title"), "second");
    browser.back().expect("back");
    assert_eq!(browser.title().expect("title after back"), "harness check");

    // Cookies need an http origin: a data: URL has none.
    let origin = serve_one_page("<title>cookies</title><p>cookies</p>");
    browser.goto(&origin).expect("the http page");
    assert_eq!(browser.title().expect("http title"), "cookies");
    browser.add_cookie("flavour", "oat").expect("add a cookie");
    let cookies = browser
        .execute("return document.cookie;", Vec::new())
        .expect("read cookies");
    assert_eq!(cookies, json!("flavour=oat"));
    browser.delete_all_cookies().expect("delete cookies");
    let cookies = browser
        .execute("return document.cookie;", Vec::new())
        .expect("read cookies again");
    assert_eq!(cookies, json!(""));
}

/// An HTTP server on a free loopback port that answers every request with `html`, for as long
/// as the test runs; answers its URL.
fn serve_one_page(html: &'static str) -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("its address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
            let mut line = String::new();
            // The request head ends at its first empty line; the body (there is none) is ignored.
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    format!("http://{addr}/")
}
