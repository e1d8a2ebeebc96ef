//! `differnet serve` as a process: signals. SIGHUP reloads the models, SIGTERM lets the request
//! in flight finish before the process exits cleanly.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

#[test]
fn sighup_reloads_and_sigterm_finishes_requests_in_flight() {
    let home = home_with_efficientnet();
    let model = home.path().join("part.safetensors");
    efficientnet_model(16, Some(1.0), 3).save(&model).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_differnet"))
        .args(["serve", "--model", &format!("part={}", model.display()), "--addr", "127.0.0.1:0", "--views", "1", "--heatmap-views", "2"])
        .env("DIFFERNET_HOME", home.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let port: u16 = line
        .rsplit("http://127.0.0.1:")
        .next()
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    // keep draining the server's log so it never blocks on a full pipe
    std::thread::spawn(move || for _ in stderr.lines() {});

    assert_eq!(http(port, "GET", "/healthz", b"").0, 200);
    let img = png_image(48, 48, 5);
    let (status, body) = http(port, "POST", "/v1/score", &img);
    assert_eq!(status, 200, "{body}");

    // SIGHUP: the model file was replaced; the service now answers with the new one
    efficientnet_model(16, Some(1.0), 4).save(&model).unwrap();
    signal(child.id(), "-HUP");
    let mut reloaded = false;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if http(port, "GET", "/metrics", b"").1.contains("differnet_reloads_total 1") {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "no reload after SIGHUP");
    let new_id: String = differnet::model::Model::read_manifest(&model).unwrap().parameters_sha256.chars().take(16).collect();
    assert!(http(port, "POST", "/v1/score", &img).1.contains(&new_id));

    // SIGTERM while a slow request (with a heat map) is in flight: it still gets its answer
    let slow = std::thread::spawn(move || http(port, "POST", "/v1/score?heatmap=1", &png_image(64, 64, 2)));
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(child.id(), "-TERM");
    let (status, body) = slow.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("overlay_png_base64"));
    assert!(child.wait().unwrap().success(), "the server exits cleanly after draining");
}
