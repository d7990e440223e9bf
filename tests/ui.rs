//! `isrctl ui` in real browsers (headless Chromium and Firefox ESR, the two
//! the UI supports, through WebDriver): the page lists the resumed parcel,
//! its "local" count rises to the total while the test reads through the
//! mount, a write turns cells "changed", sync (confirmed in the dialog)
//! makes a version `isrctl history` shows, hoard makes every chunk local,
//! sync under another machine's lock shows `isrctl sync`'s refusal, and
//! discard ends the session. Also: a request without the token
//! is refused, the server listens on 127.0.0.1 only, and screenshots of the
//! page are kept in target/ui-screenshots/.
//!
//! Needs FUSE and the browsers with their drivers (`bash
//! .ci/install-deps.sh` installs them): /usr/bin/chromium and
//! /usr/bin/chromedriver (Debian `chromium` and `chromium-driver`),
//! /usr/bin/firefox-esr (Debian `firefox-esr`) and /usr/local/bin/geckodriver
//! (`cargo install --root /usr/local geckodriver`).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Env, binary_dir, free_ports, random_bytes};

const PARCEL: &str = "webui";
/// Generous: the test waits for what the page shows, never for a time.
const PATIENCE: Duration = Duration::from_secs(90);

/// A browser the UI supports, driven headless through its WebDriver.
#[derive(Clone, Copy)]
enum Browser {
    Chromium,
    Firefox,
}

impl Browser {
    fn name(self) -> &'static str {
        match self {
            Browser::Chromium => "chromium",
            Browser::Firefox => "firefox",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Browser::Chromium => "/usr/bin/chromium",
            Browser::Firefox => "/usr/bin/firefox-esr",
        }
    }

    fn driver(self) -> &'static str {
        match self {
            Browser::Chromium => "/usr/bin/chromedriver",
            Browser::Firefox => "/usr/local/bin/geckodriver",
        }
    }

    fn require(self) {
        let install = match self {
            Browser::Chromium => "the Debian packages chromium and chromium-driver",
            Browser::Firefox => {
                "the Debian package firefox-esr and geckodriver (`cargo install --root /usr/local geckodriver`)"
            }
        };
        for program in [self.binary(), self.driver()] {
            assert!(
                Path::new(program).is_file(),
                "{program} is missing: this test drives the web UI in headless {}; install \
                 {install} (`bash .ci/install-deps.sh` does)",
                self.name()
            );
        }
    }

    /// The WebDriver capabilities of a headless session with its own
    /// profile, asking nothing of the network.
    fn capabilities(self, profile: &Path) -> serde_json::Map<String, serde_json::Value> {
        let mut capabilities = serde_json::Map::new();
        match self {
            Browser::Chromium => capabilities.insert(
                "goog:chromeOptions".into(),
                serde_json::json!({
                    "binary": self.binary(),
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--window-size=1280,1400",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                }),
            ),
            Browser::Firefox => capabilities.insert(
                "moz:firefoxOptions".into(),
                serde_json::json!({
                    "binary": self.binary(),
                    "args": ["-headless", "-width", "1280", "-height", "1400",
                             "-profile", profile.display().to_string()],
                    "prefs": {
                        "app.update.enabled": false,
                        "browser.shell.checkDefaultBrowser": false,
                        "datareporting.policy.dataSubmissionEnabled": false,
                        "network.captive-portal-service.enabled": false,
                        "network.connectivity-service.enabled": false,
                        "toolkit.telemetry.enabled": false,
                    },
                }),
            ),
        };
        capabilities
    }

    /// Starts the driver on a free loopback port, once it listens.
    fn start_driver(self) -> (Driver, u16) {
        use std::os::unix::process::CommandExt;
        let port = free_ports(1)[0];
        let child = Command::new(self.driver())
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.driver()));
        let mut process = Driver(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                process.0.try_wait().unwrap().is_none(),
                "{} exited before listening",
                self.driver()
            );
            assert!(
                Instant::now() < deadline,
                "{} did not listen within 30 s",
                self.driver()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (process, port)
    }
}

/// A child process killed (and reaped) on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebDriver server in a process group of its own, killed whole on drop:
/// the browsers it started go with it even when the test fails midway.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback: the status code.
fn status_of(port: u16, path: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {reply:?}"))
}

/// The local addresses (hex `ADDR:PORT` of /proc/net/tcp*) of the listening
/// TCP sockets of process `pid`.
fn listening_addresses(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address, state (0A: LISTEN), inode
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                found.push(fields[1].to_owned());
            }
        }
    }
    found
}

async fn read_page(client: &fantoccini::Client) -> serde_json::Value {
    let script = r#"
        const card = document.querySelector('[data-parcel="webui"]');
        if (!card) return null;
        const text = (sel) => card.querySelector(sel).textContent;
        const counts = {};
        for (const span of card.querySelectorAll('[data-state-count]')) {
            counts[span.dataset.stateCount] = Number(span.textContent);
        }
        return {
            local: Number(text('[data-field="chunks-local"]')),
            total: Number(text('[data-field="chunks-total"]')),
            counts,
            files: card.querySelectorAll('.file canvas').length,
            timeline: [...card.querySelectorAll('[data-field="timeline"] li')].map((li) => li.textContent),
            result: text('[data-field="result"]'),
            error: card.querySelector('[data-field="error"]').hidden ? "" : text('[data-field="error"]'),
        };
    "#;
    client
        .execute(script, Vec::new())
        .await
        .expect("reading the page")
}

/// Polls the page until `done` holds of what it shows.
async fn wait_for_page(
    client: &fantoccini::Client,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let page = read_page(client).await;
        if done(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what}; it shows {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The element `css` finds, once it is there.
async fn wait_for(client: &fantoccini::Client, css: &str) -> fantoccini::elements::Element {
    client
        .wait()
        .for_element(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

/// Clicks the element `css` finds, once it is there.
async fn click(client: &fantoccini::Client, css: &str) {
    wait_for(client, css)
        .await
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

/// Keeps a screenshot of the page as target/ui-screenshots/`name`.
async fn save_screenshot(client: &fantoccini::Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // target/<profile>/ → target/ui-screenshots/
    let dir = binary_dir()
        .parent()
        .expect("target dir")
        .join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), &png).unwrap();
}

#[test]
fn the_web_ui_shows_a_resume_live_and_syncs_in_chromium() {
    the_web_ui_shows_a_resume_live_and_syncs(Browser::Chromium);
}

#[test]
fn the_web_ui_shows_a_resume_live_and_syncs_in_firefox() {
    the_web_ui_shows_a_resume_live_and_syncs(Browser::Firefox);
}

fn the_web_ui_shows_a_resume_live_and_syncs(browser: Browser) {
    Env::require_fuse();
    browser.require();
    let env = Env::local();
    // 96 chunks of 64 KiB: random data with a zero stretch in the middle.
    let source = env.path("source");
    std::fs::create_dir_all(&source).unwrap();
    let mut disk = random_bytes("ui disk", 6 << 20);
    disk[2 << 20..3 << 20].fill(0);
    std::fs::write(source.join("disk.img"), &disk).unwrap();
    std::fs::write(source.join("notes.txt"), random_bytes("notes", 200_000)).unwrap();
    env.ok(&[
        "import",
        PARCEL,
        source.to_str().unwrap(),
        "--chunk-size",
        "65536",
        "-m",
        "imported",
    ]);
    let other = env.another_machine();

    let mut ui = Process(
        env.isrctl()
            .args(["--json", "ui", "--no-open"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting isrctl ui"),
    );
    let mut line = String::new();
    BufReader::new(ui.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let printed: serde_json::Value = serde_json::from_str(&line).expect("one JSON line");
    assert_eq!(printed["schema"], 1);
    let url = printed["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let port: u16 = url["http://127.0.0.1:".len()..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // Nothing without the token; the token opens the page (via its cookie).
    for path in ["/", "/events", "/api/parcels", "/app.js", "/?token=0123"] {
        let status = status_of(port, path);
        assert!(status == 401 || status == 403, "{path}: HTTP {status}");
    }
    assert_eq!(
        status_of(
            port,
            &url["http://127.0.0.1:".len() + port.to_string().len()..]
        ),
        303
    );
    // Only 127.0.0.1 listens (7F000001, little-endian in /proc).
    let addresses = listening_addresses(ui.0.id());
    assert!(
        !addresses.is_empty(),
        "no listening socket found for isrctl ui"
    );
    assert!(
        addresses.iter().all(|a| a.starts_with("0100007F:")),
        "isrctl ui listens beyond 127.0.0.1: {addresses:?}"
    );

    let (_driver, driver_port) = browser.start_driver();
    let profile = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = fantoccini::ClientBuilder::rustls()
            .expect("a TLS connector for fantoccini")
            .capabilities(browser.capabilities(profile.path()))
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .unwrap_or_else(|e| panic!("a WebDriver session with {}: {e}", browser.driver()));
        client.goto(&url).await.unwrap();
        // The redirect drops the token from the address bar.
        let address = client.current_url().await.unwrap();
        assert_eq!(address.query(), None, "{address}");

        // Resumed with the page open: it appears there.
        let mount = PathBuf::from(env.ok(&["resume", PARCEL]).trim());
        let page = wait_for_page(&client, "the resumed parcel", |p| {
            p["files"].as_u64() == Some(2)
        })
        .await;
        assert!(page["total"].as_u64().unwrap() > 0, "{page}");

        // Read everything through the mount: every chunk becomes local.
        for file in ["disk.img", "notes.txt"] {
            let read = std::fs::read(mount.join(file)).unwrap();
            assert!(!read.is_empty());
        }
        let page = wait_for_page(&client, "local equal to the total", |p| {
            p["local"] == p["total"] && p["counts"]["remote"] == 0
        })
        .await;
        assert!(page["counts"]["local"].as_u64().unwrap() > 0, "{page}");
        assert!(page["counts"]["zero"].as_u64().unwrap() > 0, "{page}");
        // The resume's steps as isrfsd recorded them (this parcel has no VM).
        let steps: Vec<&str> = page["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(steps.len(), 4, "{page}");
        for (step, label) in steps.iter().zip([
            "requested: ",
            "mounted: ",
            "VM running: ",
            "first chunk fetched: ",
        ]) {
            assert!(step.starts_with(label), "{step:?} in {page}");
        }
        assert!(
            !steps[0].contains("not yet") && !steps[1].contains("not yet"),
            "{page}"
        );
        assert!(steps[2].ends_with("no VM"), "{page}");
        assert!(!steps[3].contains("not yet"), "{page}");

        // A write turns cells "changed".
        {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(mount.join("disk.img"))
                .unwrap();
            file.write_all(&random_bytes("ui write", 300_000)).unwrap();
            file.sync_all().unwrap();
        }
        wait_for_page(&client, "changed chunks", |p| {
            p["counts"]["changed"].as_u64().unwrap_or(0)
                + p["counts"]["uploading"].as_u64().unwrap_or(0)
                > 0
        })
        .await;

        // Sync, confirmed in the dialog (focus starts in its message field).
        click(
            &client,
            r#"[data-parcel="webui"] button[data-action="sync"]"#,
        )
        .await;
        wait_for(&client, "#confirm-message")
            .await
            // Enter (WebDriver's key U+E007) confirms, as the keyboard would.
            .send_keys("from the web UI\u{E007}")
            .await
            .unwrap();
        let page = wait_for_page(&client, "the sync's outcome", |p| {
            p["result"]
                .as_str()
                .is_some_and(|r| r.contains("version 2"))
                || !p["error"].as_str().unwrap_or("").is_empty()
        })
        .await;
        assert_eq!(page["error"], "", "{page}");
        assert!(
            page["result"]
                .as_str()
                .unwrap()
                .contains("synced as version 2"),
            "{page}"
        );

        // The parcels list shows the new version too, once the refresh the
        // sync started and the one clicked here have both answered.
        click(&client, "#refresh-parcels").await;
        let parcels = r#"#parcels[aria-busy="false"] [data-store-parcel="webui"]"#;
        wait_for(&client, &format!(r#"{parcels} tr[data-version="2"]"#)).await;
        click(&client, &format!("{parcels} summary")).await;
        // A refresh keeps the version list open.
        click(&client, "#refresh-parcels").await;
        wait_for(&client, &format!("{parcels} details[open]")).await;
        save_screenshot(&client, &format!("resume-{}.png", browser.name())).await;
        // At 200 % zoom it reflows into one column.
        client
            .execute("document.body.style.zoom = '2';", Vec::new())
            .await
            .unwrap();
        save_screenshot(&client, &format!("resume-zoom-200-{}.png", browser.name())).await;
        client
            .execute("document.body.style.zoom = '';", Vec::new())
            .await
            .unwrap();
        let history = env.json(&["history", PARCEL]);
        let versions = history["versions"].as_array().unwrap();
        let synced = versions
            .iter()
            .find(|v| v["version"] == 2)
            .unwrap_or_else(|| panic!("no version 2 in {history}"));
        assert_eq!(synced["message"], "from the web UI");

        // Hoard, confirmed: every chunk is local.
        click(
            &client,
            r#"[data-parcel="webui"] button[data-action="hoard"]"#,
        )
        .await;
        click(&client, "#confirm-ok").await;
        let page = wait_for_page(&client, "the hoard's outcome", |p| {
            p["result"]
                .as_str()
                .is_some_and(|r| r.contains("chunks are local"))
                || !p["error"].as_str().unwrap_or("").is_empty()
        })
        .await;
        assert_eq!(page["error"], "", "{page}");

        // Another machine breaks the lock and resumes: the page's sync is
        // refused as `isrctl sync` is, naming the holder.
        other.ok(&["unlock", "--force", PARCEL]);
        other.ok(&["resume", PARCEL]);
        let cli = env.fails(&["sync", PARCEL], 5);
        let cli = cli.trim().trim_start_matches("isrctl: ");
        click(
            &client,
            r#"[data-parcel="webui"] button[data-action="sync"]"#,
        )
        .await;
        click(&client, "#confirm-ok").await;
        let page = wait_for_page(&client, "the refusal", |p| {
            !p["error"].as_str().unwrap_or("").is_empty()
        })
        .await;
        let shown = page["error"].as_str().unwrap();
        assert!(shown.starts_with("conflict (exit 5): "), "{shown}");
        assert!(
            shown.contains(cli),
            "the page shows {shown:?}, isrctl {cli:?}"
        );
        let holder = other.json(&["ls"])["parcels"][0]["lock"]["holder"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(shown.contains(&holder), "{shown} does not name {holder}");

        // Discard, confirmed: the session ends and leaves the page.
        click(
            &client,
            r#"[data-parcel="webui"] button[data-action="discard"]"#,
        )
        .await;
        click(&client, "#confirm-ok").await;
        wait_for_page(&client, "the discarded session gone", |p| p.is_null()).await;
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            !mounts.contains(mount.to_str().unwrap()),
            "{} is still mounted after the page's discard",
            mount.display()
        );
        client.close().await.unwrap();
    });

    // SIGTERM ends the server, successfully.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ui.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = ui.0.wait().unwrap();
    assert!(status.success(), "isrctl ui ended with {status}");
    other.ok(&["checkin", PARCEL]);
}
