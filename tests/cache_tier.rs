//! A caching tier in front of the store (issue 17, part 3), with real parts:
//! SeaweedFS as the S3 store, one nginx as the counted origin in front of it
//! (every request to the store passes it and is logged), and the same nginx,
//! on another port, as a `proxy_cache` in front of that origin: the machines'
//! read URL. Only chunks are public (a bucket policy for `chunks/*`), and
//! nginx caches what isr's uploads mark cacheable (no `proxy_cache_valid`:
//! the store's `Cache-Control` decides).
//!
//! Ten fresh machines resume one parcel and read all of it through the cache:
//! the origin serves each chunk once, and every machine reads the right bytes.
//! Then a cached chunk is damaged in nginx's cache directory: the next
//! machine's tag check catches it, the chunk comes from the store itself
//! (bypassing the cache), and the machine reads the right bytes.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::nginx::{LogLine, Nginx};
use support::{Env, SeaweedFs};

const PREFIX: &str = "tier";
const MACHINES: usize = 10;

/// An S3 request signed with the server's keys, by curl; the status code and
/// the response headers (lower-case names).
fn s3_curl(
    server: &SeaweedFs,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, BTreeMap<String, String>) {
    let curl = support::find_program("curl", "install it with `apt-get install curl`");
    let mut command = Command::new(curl);
    command
        .args(["-s", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"])
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!("{}:{}", server.access_key, server.secret_key))
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-X", method]);
    if method == "HEAD" {
        command.arg("-I");
    }
    if let Some(body) = body {
        command.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let output = command
        .arg(format!("{}/{path}", server.endpoint()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let status = text
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or_else(|| panic!("curl {method} {path}: {text}"));
    let headers = text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers)
}

/// The store's chunk keys (listed at the store itself).
fn chunk_keys(server: &SeaweedFs) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = isr::store::open(
        &server.store_url(PREFIX),
        &server.settings(),
        support::quick_retry(),
    )
    .unwrap();
    let mut keys = runtime
        .block_on(store.lister().unwrap().list(isr::layout::CHUNKS))
        .unwrap();
    keys.sort();
    keys
}

/// GETs of chunks in a `counted` log, by key (`chunks/…`), for lines `keep`
/// accepts.
fn chunk_gets(lines: &[LogLine], keep: impl Fn(&LogLine) -> bool) -> BTreeMap<String, usize> {
    let marker = format!("/{PREFIX}/chunks/");
    let mut counts = BTreeMap::new();
    for line in lines.iter().filter(|l| l.method == "GET" && keep(l)) {
        if let Some(at) = line.uri.find(&marker) {
            let key = &line.uri[at + PREFIX.len() + 2..];
            *counts.entry(key.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Resumes `name` on `machine`, reads every file and compares it with
/// `source`; returns the session's `fetch` counters before it is discarded.
fn resume_and_read(machine: &Env, name: &str, source: &Path) -> serde_json::Value {
    let mount = PathBuf::from(
        machine.json(&["resume", name])["mount"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        let file = entry.file_name();
        assert!(
            std::fs::read(mount.join(&file)).unwrap() == std::fs::read(entry.path()).unwrap(),
            "{file:?} read through the cache tier differs from what was imported"
        );
    }
    let status = machine.json(&["status", name]);
    let fetch = status["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["parcel"] == name)
        .unwrap()["fetch"]
        .clone();
    machine.ok(&["discard", name]);
    machine.stop_daemon();
    fetch
}

#[test]
fn ten_machines_through_a_caching_proxy_fetch_each_chunk_once_from_the_store() {
    Env::require_fuse();
    let server = SeaweedFs::start();
    let [origin_port, cache_port] = support::free_ports(2)[..] else {
        unreachable!()
    };
    let nginx = Nginx::start(
        &format!(
            "  proxy_cache_path {{dir}}/cache levels=1:2 keys_zone=isr:4m max_size=1g inactive=7d use_temp_path=off;\n\
             server {{\n    listen 127.0.0.1:{origin_port};\n    access_log {{dir}}/origin.log counted;\n\
                 client_max_body_size 0;\n    proxy_request_buffering off;\n\
                 location / {{\n      proxy_pass http://127.0.0.1:{s3};\n      proxy_set_header Host $http_host;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n\
             server {{\n    listen 127.0.0.1:{cache_port};\n    access_log {{dir}}/cache.log counted;\n\
                 location / {{\n      proxy_pass http://127.0.0.1:{origin_port};\n      proxy_cache isr;\n\
                 proxy_cache_lock on;\n      proxy_set_header X-Isr-Via cache;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n",
            s3 = server.s3_port,
        ),
        &[origin_port, cache_port],
    );
    // Chunks, and only chunks, are readable without credentials: what a
    // cache or CDN in front of an S3 bucket reads.
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":"*","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::{}/{PREFIX}/chunks/*"]}}]}}"#,
        server.bucket
    );
    let (status, _) = s3_curl(
        &server,
        "PUT",
        &format!("{}?policy=", server.bucket),
        Some(&policy),
    );
    assert_eq!(status, 204, "the bucket policy was refused");

    // Machines reach the store through the counted origin, and read chunks
    // through the cache.
    let env = Env::s3(&server, PREFIX);
    let origin = format!("http://127.0.0.1:{origin_port}");
    let read_url = format!("http://127.0.0.1:{cache_port}/{}/{PREFIX}", server.bucket);
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "read_url = \"{read_url}\"\n{}",
            config.replace(&server.endpoint(), &origin)
        ),
    )
    .unwrap();
    let shown = env.json(&["config"]);
    assert_eq!(shown["settings"]["read_url"]["value"], read_url.as_str());
    assert!(
        shown["settings"]["read_url"]["source"]
            .as_str()
            .unwrap()
            .starts_with("config file"),
        "{shown:#}"
    );

    let mut disk = support::random_bytes("cache tier", 3 << 20);
    disk.extend(vec![0u8; 1 << 20]); // zero chunks: never stored, never fetched
    let source = env.import_files(
        "p",
        &[
            ("disk.img", disk),
            ("notes.txt", b"a small file\n".to_vec()),
        ],
    );
    let chunks = chunk_keys(&server);
    assert!(chunks.len() >= 24, "{} chunks", chunks.len());

    // Uploads marked chunks cacheable for ever, and nothing else.
    let (status, headers) = s3_curl(
        &server,
        "HEAD",
        &format!("{}/{PREFIX}/{}", server.bucket, chunks[0]),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("cache-control").map(String::as_str),
        Some(isr::store::IMMUTABLE_CACHE_CONTROL)
    );
    let record = isr::layout::record("p");
    let (status, headers) = s3_curl(
        &server,
        "HEAD",
        &format!("{}/{PREFIX}/{record}", server.bucket),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(headers.get("cache-control"), None, "{record}: {headers:?}");

    for machine in 0..MACHINES {
        let fetch = resume_and_read(&env.another_machine(), "p", &source);
        assert_eq!(fetch["verify_failures"], 0, "machine {machine}: {fetch:#}");
    }
    let origin_log = nginx.log("origin.log");
    let cache_log = nginx.log("cache.log");
    // Each chunk left the store once, for the cache; no machine asked the
    // store itself for a chunk.
    let from_store = chunk_gets(&origin_log, |l| l.via == "cache");
    assert_eq!(
        from_store.keys().cloned().collect::<Vec<_>>(),
        chunks,
        "every chunk, read through the cache"
    );
    assert!(
        from_store.values().all(|&n| n == 1),
        "a chunk the store served more than once: {from_store:?}"
    );
    assert_eq!(
        chunk_gets(&origin_log, |l| l.via != "cache"),
        BTreeMap::new()
    );
    // The cache answered the other nine machines' reads itself.
    let misses = chunk_gets(&cache_log, |l| l.cache == "MISS");
    let hits = chunk_gets(&cache_log, |l| l.cache == "HIT");
    assert!(misses.values().all(|&n| n == 1), "{misses:?}");
    assert_eq!(misses.len(), chunks.len());
    // (At least: a request the client retried under load is a second HIT,
    // which costs the store nothing; the origin counts above are exact.)
    assert_eq!(hits.len(), chunks.len(), "{hits:?}");
    assert!(
        hits.values().all(|&n| n >= MACHINES - 1),
        "each chunk a HIT for every later machine: {hits:?}"
    );
    println!(
        "{} chunks; origin chunk GETs {}, cache chunk requests {} ({} hits)",
        chunks.len(),
        from_store.values().sum::<usize>(),
        cache_log
            .iter()
            .filter(|l| l.uri.contains("/chunks/"))
            .count(),
        hits.values().sum::<usize>()
    );

    // Damage one cached chunk in nginx's cache directory (its body's last
    // byte: the headers nginx keeps before it stay intact).
    let victim = &chunks[chunks.len() / 2];
    let cached = cache_file_of(&nginx.path("cache"), victim);
    let mut bytes = std::fs::read(&cached).unwrap();
    *bytes.last_mut().unwrap() ^= 0x5a;
    std::fs::write(&cached, bytes).unwrap();

    let fetch = resume_and_read(&env.another_machine(), "p", &source);
    assert_eq!(
        fetch["verify_failures"], 1,
        "the damaged cached copy, caught by its tag: {fetch:#}"
    );
    let origin_log = nginx.log("origin.log");
    let direct = chunk_gets(&origin_log, |l| l.via != "cache");
    assert_eq!(
        direct,
        BTreeMap::from([(victim.clone(), 1)]),
        "the damaged chunk, and only it, fetched once from the store itself"
    );
    assert_eq!(
        chunk_gets(&origin_log, |l| l.via == "cache"),
        from_store,
        "the cache asked the store for nothing more"
    );
    let victim_in_cache = chunk_gets(&nginx.log("cache.log"), |l| l.cache == "HIT")[victim];
    assert_eq!(
        victim_in_cache, MACHINES,
        "the damaged copy was served once"
    );
}

/// The file in nginx's cache directory holding the response for `key` (its
/// header names the cache key, which ends in the request's URI).
fn cache_file_of(cache: &Path, key: &str) -> PathBuf {
    let mut pending = vec![cache.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let needle = format!("/{PREFIX}/{key}\n");
            if bytes
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
            {
                return path;
            }
        }
    }
    panic!("no file in {} caches {key}", cache.display());
}

#[test]
fn a_read_url_given_as_an_option_is_shown_with_its_source_and_a_bad_one_is_refused() {
    let env = Env::local();
    let shown = env.json(&["config"]);
    assert_eq!(shown["settings"]["read_url"]["source"], "default");
    let url = "http://127.0.0.1:9/isr";
    let shown = env.json(&["--read-url", url, "config"]);
    assert_eq!(shown["settings"]["read_url"]["value"], url);
    assert_eq!(shown["settings"]["read_url"]["source"], "option --read-url");
    let error = env.fails(&["--read-url", "s3://bucket/isr", "ls"], 2);
    assert!(error.contains("read_url"), "{error}");
}
